"""Tiny Hugging Face models written as GGUF bases the way llama.cpp's ``convert_hf_to_gguf.py`` writes them,
with the ``gguf`` package's writer (independently of loratools): names through ``gguf.get_tensor_name_map``,
Llama's Q/K rows permuted per head (``LlamaModel.permute``), Gemma's RMSNorm weights stored + 1, Gemma's
``lm_head`` never written, the hyperparameters each architecture's loader reads, and a byte-level BPE
tokenizer built with the ``tokenizers`` package. The runtime's base logits equal transformers' (a test says
so), which is what makes the converter's output a fair base for the adapter checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from llamacpp_support import tokenizer

#: transformers architecture -> GGUF architecture
ARCH = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "MixtralForCausalLM": "llama",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hparams(w: Any, arch: str, cfg: dict[str, Any]) -> None:
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg.get("intermediate_size") or 0)
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
    w.add_rope_freq_base(float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if "num_local_experts" in cfg or "num_experts" in cfg:  # Qwen3-MoE, Mixtral (transformers 5 saves either key)
        w.add_expert_count(n_experts(cfg))
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])


def _tokenizer(w: Any, vocab_size: int) -> None:
    tokens, merges = tokenizer(vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def _tensors(src: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def n_experts(cfg: dict[str, Any]) -> int:
    return int(cfg.get("num_experts") or cfg["num_local_experts"])


def _moe_stacks(tensors: dict[str, np.ndarray], n_layer: int, n_expert: int) -> dict[str, np.ndarray]:
    """Per-expert weights (Qwen3-MoE ``mlp.experts.{e}.gate_proj``, Mixtral ``block_sparse_moe.experts.{e}.w1``)
    stacked the way the converter stacks them (``torch.stack(dim=0)``: one 3-D tensor each, no row permutation)."""
    out = dict(tensors)
    for i in range(n_layer):
        for box, part in [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")] + [
            ("block_sparse_moe", p) for p in ("w1", "w3", "w2")
        ]:
            keys = [f"model.layers.{i}.{box}.experts.{e}.{part}.weight" for e in range(n_expert)]
            if keys[0] in out:
                out[f"model.layers.{i}.{box}.experts.{part}.weight"] = np.stack([out.pop(k) for k in keys])
    return out


def convert(src: Path, dst: Path, outtype: str = "f32") -> Path:
    """``src`` (a saved transformers model folder) as a GGUF base at ``dst``; outtype f32, f16 or q8_0."""
    import gguf

    cfg = json.loads((src / "config.json").read_text())
    arch = ARCH[cfg["architectures"][0]]
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    tmap = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], n_layer)
    w = gguf.GGUFWriter(dst, arch)
    w.add_name("loratools tiny model")  # a name with "phi3" in it makes the vocab loader look for <s>
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[outtype])
    _hparams(w, arch, cfg)
    _tokenizer(w, cfg["vocab_size"])
    tensors = _tensors(src)
    if "num_local_experts" in cfg or "num_experts" in cfg:
        tensors = _moe_stacks(tensors, n_layer, n_experts(cfg))
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if arch.startswith("gemma") and name == "lm_head.weight":
            continue  # Gemma's converter never writes lm_head
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1  # Gemma RMSNorm multiplies by (1 + w)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = llama_permute(t, n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = llama_permute(t, n_kv)
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        if outtype == "q8_0" and t.ndim >= 2 and t.shape[-1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(new, gguf.quants.quantize(t, q8), raw_dtype=q8)
        elif outtype != "f32" and t.ndim >= 2:
            w.add_tensor(new, t.astype(np.float16))
        else:
            w.add_tensor(new, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
