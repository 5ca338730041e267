"""``merge --requantize`` into an MXFP4 base streams a run of experts at a time: the bytes and the ρ report
equal the whole-tensor requantize's (a run per 16 MiB and a forced one-expert run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moe_support import run_cli

from loratools.checkpoint.quant import mxfp4
from loratools.ops.merge import requant_stream, requant_write

MOE = Path(__file__).resolve().parents[2] / "fixtures" / "moe"


def _merge(out: Path) -> tuple[bytes, dict]:
    code, text, err = run_cli(
        ["merge", MOE / "gpt-oss-mxfp4", MOE / "gpt-oss-lora", "--requantize", "-o", out, "--json"]
    )
    assert code == 0, text + err
    report = json.loads(text)["quantized_base"]
    return (out / "model.safetensors").read_bytes(), {
        m["tensor"]: (m["rho"], m["delta_norm"]) for m in report["modules"]
    }


@pytest.mark.parametrize("per", [None, 1])
def test_streamed_requantize_equals_the_whole_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per) -> None:
    calls = []
    real = requant_stream.stream_requantized

    def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202
        result = real(*a, **k)
        calls.append((a[1], result is not None))
        return result

    monkeypatch.setattr(requant_stream, "RUN_EXPERTS", per)
    monkeypatch.setattr(requant_stream, "stream_requantized", counted)
    streamed, rho_s = _merge(tmp_path / "s")
    assert len(calls) == 4 and all(done for _, done in calls) and len(rho_s) == 4
    monkeypatch.setattr(requant_write, "_streamed", lambda *a: None)
    whole, rho_w = _merge(tmp_path / "w")
    assert streamed == whole
    assert rho_s.keys() == rho_w.keys()
    for k, (rho, norm) in rho_s.items():
        assert rho == pytest.approx(rho_w[k][0], abs=2e-6) and norm == pytest.approx(rho_w[k][1], rel=1e-12)


def _codes_by_counting(x: torch.Tensor) -> torch.Tensor:
    """The earlier e2m1_codes: one comparison per boundary, a tie at an odd boundary going up."""
    a = x.abs()
    code = torch.zeros(x.shape, dtype=torch.int32)
    for i, b in enumerate(mxfp4._BOUNDARIES):
        code += (a > b).to(torch.int32)
        if i % 2:
            code += (a == b).to(torch.int32)
    return code | (torch.signbit(x).to(torch.int32) << 3)


def _quantize_by_counting(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e, n_in, rows = w.shape
    x = w.to(torch.float32).transpose(1, 2).reshape(e, rows, n_in // 32, 32)
    amax = x.abs().amax(-1)
    up = (((amax / 6.0).view(torch.int32) + 0x007FFFFF) & 0x7F800000).view(torch.float32)
    biased = (up.view(torch.int32) >> 23).clamp(0, 254)
    codes = _codes_by_counting(x / torch.ldexp(torch.ones_like(amax), biased - 127).unsqueeze(-1))
    return mxfp4.pack_codes(codes), biased.to(torch.uint8)


def _hard_values(g: torch.Generator) -> torch.Tensor:
    """Random fp32 values with every tie, both zeros, subnormals, the clip region and huge/tiny scales."""
    grid = torch.tensor(mxfp4._BOUNDARIES + mxfp4.E2M1[:8] + (6.5, 7.0, 12.0, 1e30, 3e38))
    ties = torch.cat((grid, -grid, torch.nextafter(grid, grid * 2), torch.nextafter(grid, torch.zeros_like(grid))))
    sub = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.17e-38, -1.17e-38])
    rnd = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-140, 120, (4096,), generator=g).float())
    return torch.cat((ties, sub, rnd)).float()


def test_e2m1_codes_equal_counting_on_ties_zeros_subnormals() -> None:
    x = _hard_values(torch.Generator().manual_seed(1))
    assert torch.equal(mxfp4.e2m1_codes(x), _codes_by_counting(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_blocks_bytes_equal_the_counting_rule(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    v = _hard_values(g)
    n = 3 * 64 * 96
    w = v[torch.randint(0, v.numel(), (n,), generator=g)].reshape(3, 64, 96)
    w[0, :32, 0] = 0.0  # an all-zero block (and a mixed one beside it)
    w[1] *= torch.exp2(torch.randint(-30, 30, (64, 96), generator=g).float()).clamp(max=1e-3)
    for got, want in zip(mxfp4.quantize_blocks(w), _quantize_by_counting(w), strict=True):
        assert torch.equal(got, want)
    experts = [mxfp4.quantize_blocks(w[i : i + 1]) for i in range(3)]  # each expert alone: the same bytes
    assert torch.equal(torch.cat([b for b, _ in experts]), mxfp4.quantize_blocks(w)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_into_equals_dequantize_blocks_on_every_byte_and_scale(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 300, 4, 16), generator=g).to(torch.uint8)
    blocks[0, 0, :, :] = torch.arange(64, dtype=torch.uint8).view(4, 16) * 4 + torch.arange(4).view(4, 1)
    scales = torch.randint(0, 255, (3, 300, 4), generator=g).to(torch.uint8)
    scales[0, :64].view(-1)[:255] = torch.arange(255, dtype=torch.uint8)  # every finite E8M0 scale
    want = mxfp4.dequantize_blocks(blocks, scales, dtype)
    got = mxfp4.dequantize_into(blocks, scales, torch.empty(want.shape, dtype=dtype))
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
