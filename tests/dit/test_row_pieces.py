"""A large 2-D weight (Flux's fused linear1 / qkv at full width: 132 MB in bf16) is merged a run of rows at a
time (ops/merge/stacked.py): the same bytes as the whole-tensor merge, at the memory of one run (issue 21,
benchmark: 855 -> 326 MB peak RSS on the 5.1 GB Flux-dev-shaped file). The tiny model's tensors are made "large"
by shrinking the run and row-block sizes."""

from __future__ import annotations

import dit_support as S
import pytest
import torch
from safetensors.torch import save_file

from loratools import merge
from loratools.ops.merge import apply, stacked


@pytest.fixture(scope="module")
def model():
    return S.transformer()


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "two"])
def test_row_runs_write_the_whole_tensor_merge_bytes(model, tmp_path, monkeypatch, layout):
    base = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.bfloat16() for k, v in S.to_bfl(model.state_dict()).items()}, str(base))
    loras = []
    for i, kind in enumerate(["kohya", "diffusers"] if layout == "two" else [layout]):
        path = tmp_path / f"lora{i}.safetensors"
        if kind == "kohya":
            save_file(S.kohya_flux(model, dtype=torch.bfloat16), str(path))
        else:  # per q/k/v factors: terms on rows of the fused qkv / linear1
            save_file(S.diffusers_flux(model)[0], str(path))
        loras.append(path)
    monkeypatch.setattr(apply, "BLOCK_ELEMENTS", 64)  # a few rows per block at the tiny width
    monkeypatch.setattr(stacked, "RUN_BYTES", 1 << 60)
    merge(base, loras, tmp_path / "whole.safetensors")
    calls = []
    inplace = apply.apply_inplace
    monkeypatch.setattr(apply, "apply_inplace", lambda *a, **k: calls.append(k.get("first_row", 0)) or inplace(*a, **k))
    monkeypatch.setattr(stacked, "RUN_BYTES", 1)  # one row block per run
    merge(base, loras, tmp_path / "runs.safetensors")
    assert max(calls) > 0  # weights did go by runs
    assert (tmp_path / "runs.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
