"""The runtime must load on a device that has no torch, transformers or tensorrt."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "tensorrt", "triton", "onnx")


def test_import_retrv_runtime_pulls_no_heavy_package():
    code = (
        "import sys, retrv.runtime, retrv.runtime.errors, retrv.model.config\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import retrv.runtime imported {out.stdout.strip()}"


def test_the_check_itself_can_fail():
    # Guard against a vacuous test: importing the model package must show up as torch in sys.modules.
    code = "import sys; from retrv.model import load_checkpoint; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
