"""Writing commands refuse an adapter whose update is a guess (issue 14 item 2): a PEFT config that
declares rank 8 over rank-4 tensors makes the scale alpha/r ambiguous (validate calls it an error;
merge used to merge it silently at alpha/4). ``--trust-tensors`` is the explicit opt-in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from loratools.cli.main import cli

FIX = Path(__file__).resolve().parents[2] / "fixtures"
BASE = str(FIX / "bases" / "llama")


@pytest.fixture(scope="module")
def declared_8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("amb") / "adapter"
    shutil.copytree(FIX / "peft" / "llama-lora", path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    cfg["r"] = 8
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


COMMANDS = {
    "merge": lambda a, o: ["merge", BASE, a, "-o", o],
    "convert": lambda a, o: ["convert", a, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", o + ".safetensors"],
    "resize": lambda a, o: ["resize", a, "--rank", "2", "-o", o],
    "rescale": lambda a, o: ["rescale", a, "--scale", "2", "-o", o],
    "combine": lambda a, o: ["combine", a, a, "-o", o],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_writing_commands_refuse_then_trust(command: str, declared_8: Path, tmp_path: Path) -> None:
    args = COMMANDS[command](str(declared_8), str(tmp_path / "out"))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output  # an unusable input
    first = res.output.splitlines()[0]
    expected = f"Error: {declared_8}: adapter_config.json declares rank 8 but the tensors have rank 4 in 8"
    assert first.startswith(expected)
    assert "the scale alpha/r is ambiguous" in first
    assert "--trust-tensors" in res.output
    assert not list(tmp_path.iterdir())  # nothing written
    res = CliRunner().invoke(cli, [*args, "--trust-tensors"])
    assert res.exit_code == 0, res.output


def test_trusted_merge_uses_the_tensor_rank(declared_8: Path, tmp_path: Path) -> None:
    """--trust-tensors means scale = alpha / tensor rank: the same result as the consistent adapter."""
    runner = CliRunner()
    a, b = tmp_path / "a", tmp_path / "b"
    assert runner.invoke(cli, ["merge", BASE, str(declared_8), "-o", str(a), "--trust-tensors"]).exit_code == 0
    assert runner.invoke(cli, ["merge", BASE, str(FIX / "peft" / "llama-lora"), "-o", str(b)]).exit_code == 0
    ta, tb, t0 = (load_file(p / "model.safetensors") for p in (a, b, Path(BASE)))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (tb[key] - t0[key]).abs().max() > 1e-3  # the adapter changes the weight
    assert torch.equal(ta[key], tb[key])


def test_validate_hint_names_the_opt_in(declared_8: Path) -> None:
    res = CliRunner().invoke(cli, ["validate", str(declared_8)])
    assert res.exit_code == 1
    assert "declares rank 8 (r / rank_pattern) but the tensors have rank 4" in res.output
