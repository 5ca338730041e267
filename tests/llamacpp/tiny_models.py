"""Tiny seeded transformers models, one per architecture loratools maps to GGUF, saved as model folders.

Sizes keep every GGUF row a whole number of 32-value blocks (q8_0) and the vocabulary a byte-level BPE's
(256 bytes + merges). Sequences stay shorter than any sliding window, and Gemma's attention scale is
``head_dim`` (``query_pre_attn_scalar``), the one llama.cpp's small Gemma models use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 384
_COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "rms_norm_eps": 1e-6}  # fmt: skip


def _config(arch: str) -> Any:
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_COMMON, head_dim=16, tie_word_embeddings=False)
    if arch == "llama-tied":
        return tf.LlamaConfig(**_COMMON, head_dim=16, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**_COMMON, tie_word_embeddings=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True)
    if arch == "qwen3moe":
        return tf.Qwen3MoeConfig(**{**_COMMON, "intermediate_size": 64}, head_dim=16, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                                 norm_topk_prob=True, tie_word_embeddings=False)  # fmt: skip
    if arch == "mixtral":
        return tf.MixtralConfig(**{**_COMMON, "intermediate_size": 32}, head_dim=16, num_local_experts=4,
                                num_experts_per_tok=2, tie_word_embeddings=False)  # fmt: skip
    if arch == "gemma2":
        return tf.Gemma2Config(**_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)  # fmt: skip
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                                   rope_theta=10000.0, rope_local_base_freq=10000.0)  # fmt: skip
    if arch == "phi3":
        return tf.Phi3Config(**{**_COMMON, "num_key_value_heads": 2}, tie_word_embeddings=False,
                             pad_token_id=0, sliding_window=None)  # fmt: skip
    raise KeyError(arch)


_CLASSES = {"llama": "LlamaForCausalLM", "llama-tied": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
            "gemma2": "Gemma2ForCausalLM",
            "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}  # fmt: skip


def spread_weights(model: torch.nn.Module, norm_center: float = 1.0, rest: float | None = None) -> None:
    """Norm weights ~ N(norm_center, 0.1²) (so a wrong norm rule shows), embeddings and lm_head ~ N(0, 0.5²), every
    other parameter ~ N(0, rest²) where ``rest`` is given (else left at its init); in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + norm_center)
            elif "embed" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            elif rest is not None:
                p.copy_(torch.randn_like(p) * rest)


def build(arch: str, out: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """(folder, model in eval mode) of a seeded tiny ``arch`` model; norm weights random too, so a wrong
    norm rule shows."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = _config(arch)
    model = getattr(tf, _CLASSES[arch])(cfg).eval()
    spread_weights(model, norm_center=0.0 if arch.startswith("gemma") else 1.0)
    model.save_pretrained(out)
    return out, model
