"""What of the base folder lands in a merged output: configs and tokenizer files yes, the base's other
(unmerged) weight files and exports no — a loader that prefers them would silently run the base."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from loratools.cli.main import cli
from loratools.ops.merge import merge

FIX = Path(__file__).resolve().parents[2] / "fixtures"


def _hub_like_base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(FIX / "bases" / "llama", base)
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "README.md").write_text("# a card\n")
    (base / "pytorch_model.bin").write_bytes(b"stale weights")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"stale weights")
    (base / "original" / "params.json").write_text("{}")
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_bytes(b"stale export")
    (base / "training_args.bin").write_bytes(b"args")
    return base


def test_stale_weight_files_are_left_out_and_named(tmp_path: Path) -> None:
    base = _hub_like_base(tmp_path)
    out = tmp_path / "merged"
    summary = merge(base, [FIX / "peft" / "llama-lora"], out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_args.bin",
    ]
    assert summary.left_out == [
        "onnx/model.onnx",
        "original/consolidated.00.pth",
        "original/params.json",
        "pytorch_model.bin",
    ]


def test_cli_says_what_it_left_out(tmp_path: Path) -> None:
    base = _hub_like_base(tmp_path)
    res = CliRunner().invoke(cli, ["merge", str(base), str(FIX / "peft" / "llama-lora"), "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (
        "left out 4 file(s) that hold the base's unmerged weights: onnx/model.onnx, "
        "original/consolidated.00.pth, original/params.json, pytorch_model.bin"
    ) in res.output
