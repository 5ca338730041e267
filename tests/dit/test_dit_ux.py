"""A stranger's walk-through of the diffusion-transformer commands (issue 21, UX items 1 and 2): a zero ``.alpha`` is
said, not silently read as alpha = rank; ``convert --base`` of another family is refused naming both families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from dit_support import diffusers_flux, save_pipeline, transformer
from safetensors.torch import save_file

from loratools.cli.main import cli


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dit_ux")


@pytest.fixture(scope="module")
def flux(work: Path) -> tuple[Path, Path]:
    """A tiny Flux pipeline and a diffusers-keyed LoRA for it (``transformer.…lora_A/lora_B`` + ``.alpha`` keys) whose
    every other module stores ``.alpha`` = 0 (the rest 3)."""
    model = transformer()
    pipe = save_pipeline(model, work / "flux-pipe")
    tensors, _ = diffusers_flux(model)
    out = dict(tensors)
    for i, key in enumerate(sorted(k for k in tensors if k.endswith(".lora_A.weight"))):
        out[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(0.0 if i % 2 == 0 else 3.0)
    save_file(out, work / "flux-alpha0.safetensors")
    return pipe, work / "flux-alpha0.safetensors"


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Warning:")]


def test_a_zero_alpha_is_said_once_and_info_shows_it(flux: tuple[Path, Path], tmp_path: Path) -> None:
    pipe, lora = flux
    line = f"Warning: {lora}: 15 of 30 modules store .alpha = 0, read as alpha = rank (scale 1), kohya's rule for a "
    r = run("info", lora)
    assert r.exit_code == 0, r.output
    assert _warnings(r.stderr) == [line + "zero alpha"]  # one line, on stderr, naming the file and the count
    assert "note          alpha 0 read as alpha = rank: 15 of 30 modules store .alpha = 0" in r.stdout
    d = json.loads(run("info", lora, "--json").stdout)
    assert d["alpha_zero"] == {"modules": 15, "of": 30}
    zero = [m for m in d["modules"] if m["alpha"] == m["rank"]]  # the math is kohya's: alpha = rank, scale 1
    assert len(zero) == 15 and all(m["scale"] == 1 for m in zero)
    assert all(m["alpha"] == 3 for m in d["modules"] if m not in zero)
    r = run("merge", pipe, lora, "-o", tmp_path / "merged")
    assert r.exit_code == 0 and _warnings(r.stderr) == [line + "zero alpha"], r.output  # once, whatever reads it
    assert _warnings(run("info", lora, "-q").output) == []  # -q: nothing but errors


def test_stored_alphas_warn_nothing(work: Path) -> None:
    model = transformer()
    tensors, _ = diffusers_flux(model)
    out = dict(tensors)
    for key in (k for k in tensors if k.endswith(".lora_A.weight")):
        out[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
    save_file(out, work / "flux-alpha2.safetensors")
    r = run("info", work / "flux-alpha2.safetensors", "--json")
    assert r.exit_code == 0 and _warnings(r.output) == [] and json.loads(r.stdout)["alpha_zero"] is None
