"""A PEFT folder whose adapter_config.json has no ``peft_type`` is read as LoRA (as loratools always did) and
said in one warning line: PEFT's ``PeftModel.from_pretrained`` refuses such a config (a stranger's fuzzed file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from loratools.cli.main import cli

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "moe" / "gpt-oss-lora"


def test_a_config_without_peft_type_is_read_as_lora_and_said(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(FIXTURE, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg.pop("peft_type") == "LORA"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, ["info", str(folder), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == [f"Warning: {folder / 'adapter_config.json'}: no peft_type, read as a LoRA config "
                        "(PeftModel.from_pretrained refuses a config without it; convert --to peft writes one)"]
    assert json.loads(r.stdout)["format"] == "peft"
    quiet = CliRunner().invoke(cli, ["info", str(folder), "-q"], catch_exceptions=False)
    assert quiet.exit_code == 0 and not [line for line in quiet.stderr.splitlines() if line.startswith("Warning:")]
