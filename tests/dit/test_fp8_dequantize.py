"""ComfyUI fp8-scaled dequantization by float16 bit moves equals torch's ``q.to(float32) * scale`` bit for bit:
every code of both fp8 types at scales from subnormal to huge, NaN codes included, across chunk boundaries."""

from __future__ import annotations

import pytest
import torch

from loratools.checkpoint.quant import comfy_fp8


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num().view(torch.int32), b.nan_to_num().view(torch.int32)
    )


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale", [1.0, 0.0123, 3.3e-5, 1e-30, 1e-38, 2.0**-140, 7.77, 1e30, 0.0, -2.5])
def test_every_code_at_every_scale(dtype, scale):
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    codes = codes[(codes.view(torch.uint8) & 0x7F) != 0x7F] if dtype == torch.float8_e4m3fn else codes
    s = torch.tensor(scale)
    assert _same(comfy_fp8.dequantize_fp8(codes, s), codes.to(torch.float32) * s)


def test_chunks_and_a_late_nan_code(monkeypatch):
    monkeypatch.setattr(comfy_fp8, "CHUNK", 1000)
    q = (torch.randn(37, 301) * 40).to(torch.float8_e4m3fn)
    s = torch.tensor(0.037)
    assert _same(comfy_fp8.dequantize_fp8(q, s), q.to(torch.float32) * s)
    q.view(torch.uint8)[-1, -1] = 0xFF  # a NaN code in the last chunk: torch's own cast, NaN kept
    got = comfy_fp8.dequantize_fp8(q, s)
    assert got.shape == q.shape and bool(got[-1, -1].isnan()) and _same(got, q.to(torch.float32) * s)
