"""Refusals of merges whose *result* is not finite on a quantized base (issue 19): the one line names the
base file and the tensor, and nothing is written (the damaged-input cases are tests/reliability/hostile_quant.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

import hostile_quant  # noqa: E402
from reliability_support import LLAMA_LORA, assert_one_line_error, invoke  # noqa: E402


def _huge_absmax_base(folder: Path) -> Path:
    """A valid nf4 base whose q_proj dequantizes to values near bf16's largest (finite, in range): before, a
    merge with a large weight wrote Inf into the bf16 output (only fp16 outputs were checked)."""
    t, cfg = hostile_quant.nf4_plain()
    key = f"{hostile_quant.Q}.absmax"
    t[key] = torch.full_like(t[key], 3.38e38)
    return hostile_quant._save(folder / "base-huge", t, cfg)


def test_overflowing_16bit_merge_names_the_base(tmp_path: Path) -> None:
    base = _huge_absmax_base(tmp_path)
    code, out, err = invoke("merge", base, LLAMA_LORA, "-o", tmp_path / "out", "--weights", "1e38")
    assert_one_line_error(code, out, err, "produced NaN or Inf")
    line = next(ln for ln in err.splitlines() if ln.startswith("Error: "))
    assert str(base) in line and hostile_quant.Q in line, line
    assert not (tmp_path / "out").exists()


def test_requantize_overflow_names_the_base_and_the_weight(tmp_path: Path) -> None:
    base = hostile_quant._save(tmp_path / "base", *hostile_quant.nf4())
    code, out, err = invoke("merge", base, LLAMA_LORA, "-o", tmp_path / "out", "--weights", "1e38", "--requantize")
    assert_one_line_error(code, out, err, "scales it is requantized with")
    line = next(ln for ln in err.splitlines() if ln.startswith("Error: "))
    assert str(base / "model.safetensors") in line and ".weight" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
