"""Importing the kernel package, the runtime and the TensorRT modules initialises no GPU stack: tensorrt and triton
are imported only when a function that needs them runs."""

import subprocess
import sys

GPU_STACK = ("tensorrt", "triton")


def _imported(statement: str, watch=GPU_STACK) -> list[str]:
    code = f"import sys\n{statement}\nprint(','.join(m for m in {watch!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_retrv_kernels_and_runtime_import_no_tensorrt_or_triton():
    assert _imported("import retrv.kernels, retrv.runtime") == []


def test_kernel_and_trt_modules_import_lazily():
    # the modules that USE tensorrt/triton import them on first call, not at import
    stmt = ("import retrv.kernels.reference, retrv.kernels.split, retrv.kernels.triton_icm, "
            "retrv.kernels.trt_plugin, retrv.runtime.backends.trt, retrv.export.trt")
    assert _imported(stmt) == []


def test_trt_backend_module_imports_no_torch():
    # the runtime's TensorRT backend must load on a device with numpy + tensorrt only
    assert _imported("import retrv.runtime.backends.trt", watch=("torch", "tensorrt", "triton", "onnx")) == []


def test_the_check_can_fail():
    # guard against a vacuous check: importing the Triton kernels themselves does pull triton in
    assert _imported("import retrv.kernels._triton_kernels") == ["triton"]
