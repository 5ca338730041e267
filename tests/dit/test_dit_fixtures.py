"""fixtures/dit (the README tour's Flux, Wan and Qwen-Image files) is what fixtures/make_dit_fixtures.py writes, and
each LoRA there reads as the family and layout the README shows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratools import load_adapter

ROOT = Path(__file__).resolve().parents[2]
DIT = ROOT / "fixtures" / "dit"


def test_the_fixtures_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_dit_fixtures", ROOT / "fixtures" / "make_dit_fixtures.py")
    gen = importlib.util.module_from_spec(spec)
    sys.modules["make_dit_fixtures"] = gen
    spec.loader.exec_module(gen)
    gen._write(tmp_path)
    new, old = gen._tensors(tmp_path), gen._tensors(DIT)
    assert set(new) == set(old)
    for f in new:
        assert set(new[f]) == set(old[f]) and all(torch.equal(new[f][k], old[f][k]) for k in new[f]), f
    assert sum(p.stat().st_size for p in DIT.rglob("*") if p.is_file()) < 200_000


@pytest.mark.parametrize(("lora", "dit"), [
    ("flux/kohya-lora.safetensors", {"family": "flux", "layout": "kohya"}),
    ("wan/musubi-lora.safetensors", {"family": "wan", "layout": "kohya"}),
    ("qwen-image/aitoolkit-lora.safetensors", {"family": "qwen_image", "layout": "comfyui"}),
])  # fmt: skip
def test_each_lora_reads_as_its_family_and_layout(lora, dit):
    adapter = load_adapter(DIT / lora)
    assert adapter.meta["dit"] == dit
    assert all(float(m.delta().abs().max()) > 0 for m in adapter.modules.values())
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(DIT / lora)).values() if v.ndim)
