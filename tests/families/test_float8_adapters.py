"""Adapters stored in float8 (a stranger's file: LoRA, LoHa, LoKr and OFT tensors in e4m3/e5m2 ended in an internal
error, torch has no float8 arithmetic on CPU). They are read as the exact bf16 values of their codes, so every
command treats them like the bf16 file of the same values — checked against that file's merge, bit for bit."""

from __future__ import annotations

import pytest
import torch
from families_support import FAMILIES, UNET
from safetensors.torch import load_file, save_file

from loratools import merge, validate

F8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _fp8_and_bf16(src, tmp_path, dtype):
    """The fixture with every factor (not its alphas) stored in ``dtype``, and the same values in bf16."""
    tensors = load_file(src)
    f8 = {k: (t.to(dtype) if t.ndim >= 1 and t.numel() > 1 else t) for k, t in tensors.items()}
    save_file(f8, tmp_path / "f8.safetensors")
    same = {k: (t.to(torch.bfloat16) if t.dtype == dtype else t) for k, t in f8.items()}
    save_file(same, tmp_path / "bf16.safetensors")
    return tmp_path / "f8.safetensors", tmp_path / "bf16.safetensors"


@pytest.mark.parametrize("fixture", ["lycoris-loha.safetensors", "lycoris-lokr.safetensors", "lycoris-oft.safetensors"])
@pytest.mark.parametrize("kind", sorted(F8))
def test_float8_family_files_merge_like_their_bf16_values(tmp_path, fixture, kind) -> None:
    f8, bf16 = _fp8_and_bf16(FAMILIES / fixture, tmp_path, F8[kind])
    assert validate(f8, base=UNET).ok
    merge(UNET, [f8], tmp_path / "m8")
    merge(UNET, [bf16], tmp_path / "m16")
    a, b = load_file(tmp_path / "m8" / "model.safetensors"), load_file(tmp_path / "m16" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(UNET / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the adapter did change the model


def test_float8_lora_factors(tmp_path) -> None:
    name = "lycoris_down_blocks_0_ff"
    g = torch.Generator().manual_seed(0)
    lora = {f"{name}.lora_down.weight": torch.randn(2, 16, generator=g), f"{name}.lora_up.weight":
            torch.randn(24, 2, generator=g), f"{name}.alpha": torch.tensor(3.0)}  # fmt: skip
    src = tmp_path / "src.safetensors"
    save_file(lora, src)
    f8, bf16 = _fp8_and_bf16(src, tmp_path, torch.float8_e4m3fn)
    merge(UNET, [f8], tmp_path / "m8")
    merge(UNET, [bf16], tmp_path / "m16")
    a, b = load_file(tmp_path / "m8" / "model.safetensors"), load_file(tmp_path / "m16" / "model.safetensors")
    key, base = "down_blocks.0.ff.weight", load_file(UNET / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a[key], base[key])
