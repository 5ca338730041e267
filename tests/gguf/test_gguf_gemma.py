"""Gemma 2 (an architecture Ollama's own importer also takes): no Q/K permutation, lm_head never written
by the converter, so a GGUF adapter maps names only and refuses an lm_head LoRA as tied."""

from __future__ import annotations

import pytest
import torch
from gguf_support import runtime_deltas

from loratools import load_adapter
from loratools.errors import UnsupportedError
from loratools.formats.registry import get_format


@pytest.fixture(scope="module")
def gemma(work):
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "head_dim": 8}
    cfg = Gemma2Config(vocab_size=96, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **shape)
    base = Gemma2ForCausalLM(cfg).eval()
    base.save_pretrained(work / "gemma2")
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=6, use_rslora=True, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])  # fmt: skip
    model = get_peft_model(base, lora).eval()
    model.save_pretrained(work / "gemma2-lora")
    return work / "gemma2", work / "gemma2-lora", model


def test_gemma2_runtime_delta_equals_peft(gemma, work):
    import gguf

    from loratools.checkpoint.reader import open_checkpoint

    base, adapter_dir, model = gemma
    path = work / "gemma2.gguf"
    get_format("gguf").write(load_adapter(adapter_dir, base=base), path, base=open_checkpoint(base))
    got = runtime_deltas(path)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2, 2)
    expected = {
        tmap.get_name(n.removeprefix("base_model.model.")) + ".weight": m.get_delta_weight("default").detach().double()
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    assert set(got) == set(expected) and len(got) == 8
    for name, d in expected.items():
        assert float(d.abs().max()) > 1e-3  # a real update
        assert float((got[name] - d).abs().max() / d.abs().max()) < 1e-6, name


def test_gemma2_lm_head_is_tied(gemma, work):
    from loratools.model.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(0)
    head = LoraModule(torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g), alpha=3)
    with pytest.raises(UnsupportedError, match="ties lm_head"):
        get_format("gguf").write(Adapter({"lm_head": head}), work / "g-head.gguf", base=gemma[0])
