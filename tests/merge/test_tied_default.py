"""A config.json that leaves ``tie_word_embeddings`` out means the architecture's default (issue 22 item 1.3):
transformers omits the key when it equals the class default (Gemma-2: True), so a merge that changes the
embedding must untie, exactly as when the key is written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from loratools.model.tied import TIED_BY_DEFAULT, config_ties
from loratools.ops.merge import merge

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _gemma2(folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    model.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("tie_word_embeddings") is True  # what an older transformers writes: the key left out
    (folder / "config.json").write_text(json.dumps(config))
    return model


def test_a_missing_key_is_the_class_default_not_false() -> None:
    assert config_ties({"model_type": "gemma2"}) and config_ties({"text_config": {"model_type": "gemma3_text"}})
    assert not config_ties({"model_type": "llama"})
    assert not config_ties({"model_type": "gemma2", "tie_word_embeddings": False})
    assert not config_ties(None)


def test_the_table_agrees_with_transformers_config_classes() -> None:
    from transformers import CONFIG_MAPPING

    checked = 0
    for model_type in sorted(TIED_BY_DEFAULT):
        if model_type not in CONFIG_MAPPING:
            continue
        try:
            default = CONFIG_MAPPING[model_type]().tie_word_embeddings
        except Exception:  # noqa: BLE001 - some config classes need arguments
            continue
        assert default is True, model_type
        checked += 1
    assert checked >= 30
    for untied in ("llama", "qwen2", "mistral", "qwen3"):
        assert CONFIG_MAPPING[untied]().tie_word_embeddings is False and untied not in TIED_BY_DEFAULT


def test_an_embedding_lora_on_a_gemma2_without_the_key_merges_untied_like_peft(tmp_path: Path) -> None:
    base = tmp_path / "base"
    model = _gemma2(base)
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    trained = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    trained.save_pretrained(str(tmp_path / "lora"))

    summary = merge(base, [tmp_path / "lora"], tmp_path / "merged")
    assert "model.embed_tokens.weight" in summary.untied
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["tie_word_embeddings"] is False
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    ids = torch.tensor([[1, 5, 9, 33, 60, 2]])
    with torch.no_grad():
        before, ref, got = (m(input_ids=ids).logits for m in (model, trained, merged))
    assert (ref - before).abs().max() > 1e-2  # the adapter moves the logits far beyond the tolerance
    assert (got - ref).abs().max() <= 1e-5
