"""`--verify`'s transformers oracle is plain greedy whatever the checkpoint's generation_config.json asks for, and
the pack records what it asked for."""

from __future__ import annotations

import json

import pytest
import torch

from retrv.export.pack_export import export_pack
from retrv.export.verify import MAX_NEW_TOKENS, _transformers_greedy, verification_images
from retrv.model.config import read_generation_config
from retrv.model.tiny import INSTRUCT_GENERATION, write_tiny_checkpoint
from retrv.runtime.backends.ort import OrtBackend
from retrv.runtime.errors import CheckpointError
from retrv.runtime.generate import Generator
from retrv.runtime.pack import Pack

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    ckpt = write_tiny_checkpoint(root / "ckpt", seed=7, generation="instruct")
    return ckpt, export_pack(ckpt, root / "pack", verify=True)


def _checkpoint_own_generate(ckpt, gen, prompt):
    """transformers' generate as the checkpoint's generation_config.json configures it (what the old oracle got)."""
    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32,
                                                                          attn_implementation="eager").eval()
    ids = torch.tensor([gen.render(prompt, torch.zeros((0, 3), dtype=torch.int64).numpy())])
    torch.manual_seed(0)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                           do_sample=False, eos_token_id=list(gen.cfg.tokens.eos_token_ids))
    return out[0, ids.shape[1]:].tolist()


def test_instruct_generation_config_passes_verify_and_is_recorded(instruct):
    ckpt, pack_dir = instruct
    pack = Pack.open(pack_dir)
    assert pack.manifest.extra["checkpoint_generation_config"] == INSTRUCT_GENERATION
    report = pack.manifest.validation["generation"]
    assert all(r["matches_transformers"] for r in report.values())


@pytest.mark.parametrize("case", ["text", "two_images"])
def test_pack_greedy_equals_transformers_plain_greedy_under_instruct_config(instruct, case):
    ckpt, pack_dir = instruct
    pack = Pack.open(pack_dir)
    gen = Generator.from_pack(pack, OrtBackend(pack, provider="cpu", cache_dir=None))
    prompt, images = ("Describe a red bicycle leaning on a wall.", []) if case == "text" else \
        ("Which picture shows more circles?", verification_images())
    got = gen.generate(prompt, images, MAX_NEW_TOKENS).token_ids
    assert got == _transformers_greedy(ckpt, gen, prompt, images)
    if case == "text":  # the test means something: the checkpoint's own config is not greedy on this prompt
        assert _checkpoint_own_generate(ckpt, gen, prompt) != got


def test_generation_config_with_a_bad_value_is_refused(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", generation="instruct")
    data = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**data, "top_p": "0.9"}))
    with pytest.raises(CheckpointError, match="top_p is '0.9'; expected a number"):
        read_generation_config(ckpt)
