"""Tiny models and PEFT adapters for tests, built from configs (no downloads).

Every adapter made here has a non-zero delta: PEFT's ``init_lora_weights=False`` leaves B random,
alpha differs from r, and the targets include non-square projections.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

VOCAB = 96


def llama_config(**kw: Any):
    from transformers import LlamaConfig

    base = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


def gpt2_config(**kw: Any):
    from transformers import GPT2Config

    base = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    return GPT2Config(**base)


def bert_config(**kw: Any):
    from transformers import BertConfig

    base = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    base.update(kw)
    return BertConfig(**base)


def build_model(kind: str = "llama", seed: int = 0, **config_kw: Any) -> torch.nn.Module:
    """A tiny random model: ``llama`` (LlamaForCausalLM), ``gpt2`` (GPT2LMHeadModel), ``bert`` (BertModel)."""
    from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(llama_config(**config_kw))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(gpt2_config(**config_kw))
    elif kind == "bert":
        model = BertModel(bert_config(**config_kw))
    else:
        raise ValueError(kind)
    return model.eval()


DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value", "intermediate.dense"],
}


def save_base(
    model: torch.nn.Module,
    path: str | Path,
    *,
    max_shard_size: str | None = None,
    dtype: torch.dtype | None = None,
    safe_serialization: bool = True,
) -> Path:
    """``save_pretrained`` a copy of ``model`` (optionally cast and sharded)."""
    m = copy.deepcopy(model)
    if dtype is not None:
        m = m.to(dtype)
    kw: dict[str, Any] = {"safe_serialization": safe_serialization}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    m.save_pretrained(str(path), **kw)
    return Path(path)


def make_peft(
    model: torch.nn.Module,
    path: str | Path | None = None,
    *,
    kind: str = "llama",
    r: int = 4,
    lora_alpha: float = 7,
    target_modules: list[str] | None = None,
    seed: int = 1,
    **lora_kw: Any,
):
    """A PeftModel over a deep copy of ``model`` with random (non-zero) A and B; saved if ``path``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or DEFAULT_TARGETS[kind],
        init_lora_weights=False,
        **lora_kw,
    )
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    if path is not None:
        peft_model.save_pretrained(str(path))
    return peft_model


def sample_inputs(batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def run_cli(args: list) -> tuple[int, str, str]:
    """``loratools ARGS`` (any path-like arguments) through the real entry point, error boundary
    included: (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from loratools.cli.main import main

    runner = CliRunner()
    with runner.isolation() as streams:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = streams[0].getvalue().decode(), streams[1].getvalue().decode()
    return code, out, err
