"""An ONNX merge target applies the wrong-base rule of merge (issue 19): an adapter that says it was trained
on another model than the export's config.json describes is refused, --allow-other-base merges it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bind_support import run_cli

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_onnx_merge_refuses_an_adapter_of_another_base(tmp_path) -> None:
    onnx = tmp_path / "onnx"
    run_cli("export-onnx", FIXTURES / "bases" / "llama", "-o", onnx)
    assert json.loads((onnx / "config.json").read_text())["model_type"] == "llama"
    run_cli("merge", onnx, FIXTURES / "peft" / "llama-lora", "-o", tmp_path / "ok")  # its own base: merged

    other = tmp_path / "claims-gpt2"
    shutil.copytree(FIXTURES / "peft" / "llama-lora", other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(FIXTURES / "bases" / "gpt2")
    cfg["auto_mapping"] = {"base_model_class": "GPT2LMHeadModel", "parent_library": "transformers"}
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    r = run_cli("merge", onnx, other, "-o", tmp_path / "refused", code=2)
    assert "was trained on" in r.output and "--allow-other-base" in r.output
    assert not (tmp_path / "refused").exists()
    run_cli("merge", onnx, other, "-o", tmp_path / "forced", "--allow-other-base")
    assert (tmp_path / "forced" / "model.onnx").is_file()
