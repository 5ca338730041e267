"""The wrong-base rule on a GGUF base (issue 19 item 2.3): an adapter whose recorded base states other layer or head
counts than the GGUF header is refused, --allow-other-base merges it; the architecture name is not compared
(llama.cpp writes a Mistral as llama)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gguf_support import run_cli

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
GGUF = FIXTURES / "gguf" / "llama-q8_0.gguf"


def _claiming(tmp_path: Path, **config: object) -> Path:
    other = tmp_path / "other-base"
    other.mkdir()
    cfg = json.loads((FIXTURES / "bases" / "llama" / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, **config}))
    adapter = Path(shutil.copytree(FIXTURES / "peft" / "llama-lora", tmp_path / "lora"))
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(other)
    (adapter / "adapter_config.json").write_text(json.dumps(acfg))
    return adapter


def test_a_gguf_base_with_other_layer_counts_is_refused_and_the_override_merges(tmp_path: Path) -> None:
    adapter = _claiming(tmp_path, num_hidden_layers=5)
    code, _, err = run_cli(["merge", GGUF, adapter, "-o", tmp_path / "m.gguf"])
    assert code == 2 and "num_hidden_layers 5 vs 2" in err and "--allow-other-base" in err, err
    assert not (tmp_path / "m.gguf").exists()
    code, _, err = run_cli(["merge", GGUF, adapter, "-o", tmp_path / "m.gguf", "--allow-other-base"])
    assert code == 0, err


def test_an_architecture_name_alone_is_no_evidence(tmp_path: Path) -> None:
    adapter = _claiming(tmp_path, model_type="mistral", architectures=["MistralForCausalLM"])
    code, _, err = run_cli(["merge", GGUF, adapter, "-o", tmp_path / "m.gguf"])
    assert code == 0, err


def test_an_expert_lora_into_a_dense_gguf_base_says_what_is_missing(tmp_path: Path) -> None:
    """An expert LoRA into a dense GGUF base: one line naming the stacked expert tensor it lacks (it said 'no
    llama GGUF tensor corresponds' with a --base hint); MoE bases take it (tests/gguf/test_gguf_moe.py)."""
    moe = FIXTURES / "moe" / "qwen3-moe-lora"
    code, _, err = run_cli(["merge", FIXTURES / "gguf" / "llama-f32.gguf", moe, "-o", tmp_path / "m.gguf",
                            "--allow-other-base"])  # fmt: skip
    assert code == 2 and "an expert LoRA, but the GGUF base has no stacked expert tensor blk.0.ffn_" in err, err
    assert "mixture-of-experts model" in err and not (tmp_path / "m.gguf").exists()


def test_a_merge_beyond_the_f16_range_is_refused_not_written_as_inf(tmp_path: Path) -> None:
    """A merged value finite in fp32 but beyond ±65504 became Inf in an F16 GGUF, silently (the safetensors merge
    refuses it): now one line naming the tensor, nothing written."""
    import torch
    from safetensors.torch import load_file, save_file

    base = FIXTURES / "gguf" / "llama-q8_0.gguf"  # down_proj (32x48, rows not a multiple of 32) is stored F16
    lora = Path(shutil.copytree(FIXTURES / "peft" / "llama-lora", tmp_path / "lora"))
    tensors = load_file(lora / "adapter_model.safetensors")
    key = next(k for k in tensors if "down_proj.lora_B" in k)
    tensors[key] = tensors[key] * 1e6  # ΔW around 1e5: fp32-finite, beyond F16
    save_file(tensors, lora / "adapter_model.safetensors")
    assert torch.isfinite(tensors[key]).all()
    code, _, err = run_cli(["merge", base, lora, "-o", tmp_path / "m.gguf"])
    assert code == 2 and "beyond its F16 range" in err and "ffn_down" in err, err
    assert not (tmp_path / "m.gguf").exists()
