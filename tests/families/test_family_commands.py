"""resize/spectrum through the exact low-rank form of LoHa/LoKr; one-line refusals everywhere else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from families_support import FAMILIES, LLAMA

from loratools import load_adapter
from loratools.cli.main import cli


@pytest.mark.parametrize("name", ["peft-loha", "peft-lokr", "lycoris-loha-tucker.safetensors"])
def test_spectrum_of_loha_lokr_is_the_dense_spectrum(name):
    from loratools.ops.spectrum import spectrum

    d = spectrum(FAMILIES / name)
    adapter = load_adapter(FAMILIES / name)
    for row in d["modules"]:
        m = adapter.modules[row["name"]]
        dense = torch.linalg.svdvals(m.matrix(None, torch.float64))
        k = len(row["singular_values"])
        torch.testing.assert_close(
            torch.tensor(row["singular_values"], dtype=torch.float64), dense[:k], atol=1e-9, rtol=1e-7
        )
        assert all(float(x) < 1e-9 * float(dense[0]) for x in dense[k:])


def test_resize_lokr_is_optimal(tmp_path: Path):
    from loratools.ops.resize import resize

    resize(FAMILIES / "peft-lokr", rank=2, output=tmp_path / "r")
    src, out = load_adapter(FAMILIES / "peft-lokr"), load_adapter(tmp_path / "r")
    assert out.families() == {"lora"}
    for name, m in src.modules.items():
        d = m.matrix(None, torch.float64)
        s = torch.linalg.svdvals(d)
        best = float((s[2:] ** 2).sum().sqrt())
        got = float((out.modules[name].delta().double() - d).norm())
        assert got <= 1.01 * best + 1e-6


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["resize", "peft-oft", "--rank", "2", "-o", "{out}"], "(OFT) is not low-rank without its base"),
        (["rescale", "peft-loha", "--alpha", "3", "-o", "{out}"], "is LoHa, not plain LoRA"),
        (["convert", "peft-ia3", "--to", "gguf", "--base", str(LLAMA), "-o", "{out}.gguf"], "is (IA)³, not plain"),
        (["merge", str(LLAMA), "peft-boft", "--weights", "0.5", "-o", "{out}"], "BOFT; its update multiplies"),
        (["convert", "peft-oft", "--to", "peft", "--as-lora", "-o", "{out}"], "depends on the base weight"),
    ],
)
def test_refusals_are_one_line(args, words, tmp_path: Path):
    argv = [str(FAMILIES / a) if (FAMILIES / a).exists() else a.replace("{out}", str(tmp_path / "o")) for a in args]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code != 0 and "Traceback" not in res.output
    first = res.output.splitlines()[0]
    assert first.startswith("Error: ") and words in first, res.output
