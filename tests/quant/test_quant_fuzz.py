"""Seeded fuzzing of quantized bases (issue 19): random changes to bitsandbytes 4/8-bit, FP8, GPTQ and AWQ quant
states (JSON fields, tensor shapes, element counts, dtypes, NaN/Inf/huge values), each base through ``merge``
(16-bit, and ``--requantize`` where the scheme has it), ``validate --base`` and ``info --base``.

What must hold for every one: the command ends with a result or a one-line loratools error (exit 0, 1 or 2),
never an internal error or traceback; a failed merge leaves nothing behind; and a merge that succeeds wrote
no NaN/Inf (its raw tensors are finite and a requantized output dequantizes to finite weights).
``LORATOOLS_FUZZ_EXAMPLES`` sets the number of seeds (default 80; the same seeds every run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

import hostile_quant  # noqa: E402
import hostile_quant_schemes  # noqa: E402
from reliability_support import LLAMA_LORA, invoke  # noqa: E402

SEEDS = range(int(os.environ.get("LORATOOLS_FUZZ_EXAMPLES", "80")))


def _run(*args: object) -> tuple[int, str]:
    code, out, err = invoke(*args)
    text = out + err
    assert "Traceback" not in text and "internal error" not in text.lower(), text
    assert code in (0, 1, 2), text
    if code == 2:
        assert len([ln for ln in err.splitlines() if ln.startswith("Error: ")]) == 1, err
    return code, text


def _assert_finite_output(out: Path) -> None:
    from safetensors import safe_open

    from loratools.checkpoint.reader import open_checkpoint

    for f in sorted(out.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = st.get_tensor(k)
                if t.is_floating_point():
                    assert bool(torch.isfinite(t.float()).all()), (f, k)
    with open_checkpoint(out) as reader:
        if reader.quant is not None:  # a requantized output: every module dequantizes to finite values
            for key in reader.quant.tensors:
                assert bool(torch.isfinite(reader.get(key).float()).all()), key


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("generator", [hostile_quant, hostile_quant_schemes], ids=["bnb-fp8-gptq-awq", "ct-mlx-mxfp4"])
def test_fuzzed_quant_state(seed: int, generator, tmp_path: Path) -> None:  # noqa: ANN001
    source, base = generator.fuzz_base(seed, tmp_path)
    _run("info", LLAMA_LORA, "--base", base)
    _run("validate", LLAMA_LORA, "--base", base)
    for extra in ([], ["--requantize"]) if source in generator.REQUANTIZABLE else ([],):
        out = tmp_path / f"out{len(extra)}"
        code, text = _run("merge", base, LLAMA_LORA, "-o", out, *extra)
        if code == 0:
            _assert_finite_output(out)
        else:
            assert not out.exists(), text
            assert not any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir()), text


@pytest.mark.parametrize("generator", [hostile_quant, hostile_quant_schemes], ids=["bnb-fp8-gptq-awq", "ct-mlx-mxfp4"])
def test_fuzzer_breaks_most_bases(tmp_path: Path, generator) -> None:  # noqa: ANN001
    """The fuzzer is not a no-op: most of its bases are refused by the 16-bit merge."""
    refused = 0
    for seed in range(12):
        _, base = generator.fuzz_base(seed, tmp_path)
        refused += invoke("merge", base, LLAMA_LORA, "-o", tmp_path / f"o{seed}")[0] != 0
    assert refused >= 6, refused
