"""validate names a diffusion-transformer file's format as info does (an ai-toolkit Qwen-Image file is ``comfyui``,
not the ``kohya`` reader that opened it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from loratools.cli.main import cli

DIT = Path(__file__).resolve().parents[2] / "fixtures" / "dit"


@pytest.mark.parametrize("lora", ["qwen-image/aitoolkit-lora.safetensors", "wan/musubi-lora.safetensors"])
def test_validate_and_info_name_the_same_format(lora: str) -> None:
    runner = CliRunner()
    info = runner.invoke(cli, ["info", str(DIT / lora), "--json"], catch_exceptions=False)
    valid = runner.invoke(cli, ["validate", str(DIT / lora), "--json"], catch_exceptions=False)
    assert info.exit_code == 0 and valid.exit_code == 0, (info.output, valid.output)
    assert json.loads(valid.output)["format"] == json.loads(info.output)["format"]
