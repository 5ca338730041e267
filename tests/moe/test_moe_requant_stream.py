"""``merge --requantize`` into an MXFP4 base streams a run of experts at a time: the bytes and the ρ report
equal the whole-tensor requantize's (a run per 16 MiB and a forced one-expert run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moe_support import run_cli

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
