"""Tiny mixture-of-experts models and PEFT ``target_parameters`` adapters for tests/moe (no downloads).

Models come from transformers configs (4–8 experts, 2 layers, random weights); adapters from PEFT's own
``save_pretrained`` with ``init_lora_weights=False`` (random non-zero B), alpha ≠ r. Qwen3-MoE and Mixtral
save per-expert tensors (``experts.{i}.gate_proj`` / ``w1`` ...), gpt-oss keeps its fused 3-D experts.
"""

from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from models import run_cli  # noqa: E402, F401 - one CLI runner for every test folder

warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 96
#: PEFT's forward and a merged checkpoint agree to this in fp32 (the issue's bound)
TOL = 1e-5
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


#: what every tiny MoE config here shares: 2 layers of width 32, 4 heads (2 KV) of 8, 2 experts per token
TINY: dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts_per_tok=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


def qwen3_moe_config(num_experts: int = 4, **kw: Any):
    from transformers import Qwen3MoeConfig

    shape = dict(intermediate_size=48, moe_intermediate_size=24, num_experts=num_experts, tie_word_embeddings=False)
    return Qwen3MoeConfig(**{**TINY, **shape, **kw})


def mixtral_config(num_experts: int = 4, **kw: Any):
    from transformers import MixtralConfig

    return MixtralConfig(**{**TINY, "intermediate_size": 24, "num_local_experts": num_experts, **kw})


def gpt_oss_config(num_experts: int = 4, **kw: Any):
    from transformers import GptOssConfig

    shape = dict(
        intermediate_size=24,
        num_local_experts=num_experts,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return GptOssConfig(**{**TINY, **shape, **kw})


CONFIGS = {"qwen3_moe": qwen3_moe_config, "mixtral": mixtral_config, "gpt_oss": gpt_oss_config}


def build_moe(kind: str, seed: int = 0, num_experts: int = 4, **kw: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](num_experts, **kw))
    if kind == "gpt_oss":  # its init leaves the expert biases and router at zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("_bias", "router.bias", "sinks")):
                    p.normal_(0, 0.1)
    return model.eval()


def moe_peft(model: torch.nn.Module, path: Path | None = None, *, seed: int = 1, **lora_kw: Any):
    """A PeftModel with ``target_parameters`` (default: both expert parameters), random A and B; saved if
    ``path``. ``target_modules=[]``: no module targets, so PEFT's transformers-5 MoE retargeting stays off."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kw = dict(r=2, lora_alpha=5, target_modules=[], target_parameters=EXPERT_TARGETS, init_lora_weights=False)
    kw.update(lora_kw)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**kw)).eval()
    with torch.no_grad():  # PEFT's random init is small: make the update move the logits well past TOL
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    if path is not None:
        pm.save_pretrained(str(path))
    return pm


@dataclass
class MoeCase:
    kind: str
    base: Path
    adapter: Path
    model: torch.nn.Module
    peft: Any


def make_moe_case(tmp: Path, kind: str, *, num_experts: int = 4, **lora_kw: Any) -> MoeCase:
    model = build_moe(kind, num_experts=num_experts)
    base = tmp / f"{kind}-base"
    model.save_pretrained(str(base))
    adapter = tmp / f"{kind}-lora"
    pm = moe_peft(model, adapter, **lora_kw)
    return MoeCase(kind, base, adapter, model, pm)


def sample_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def assert_moe_parity(merged: Path, case: MoeCase) -> tuple[float, float]:
    """The merged checkpoint loads in transformers and equals the unmerged PeftModel on the logits (≤ TOL),
    after showing that the adapter moves them far beyond TOL; returns (moved, error)."""
    ids = sample_ids()
    base, peft = logits(case.model, ids), logits(case.peft, ids)
    moved = float((peft - base).abs().max())
    assert moved > 1000 * TOL, f"the adapter barely moves the logits ({moved:.3g}): the parity test would prove nothing"
    err = float((logits(load_model(merged), ids) - peft).abs().max())
    assert err <= TOL, f"merged logits differ from the PeftModel's by {err:.3g}"
    return moved, err


def wrappers(peft_model: Any) -> dict[str, Any]:
    """``parameter path -> lora.ParamWrapper`` of a PeftModel (nested wrappers unwrapped)."""
    from peft.tuners.lora.layer import ParamWrapper

    found = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            host = name
            while host.endswith(".base_layer"):
                host = host[: -len(".base_layer")]
            found[f"{host}.{module.parameter_name}"] = module
    return found


__all__ = [
    "EXPERT_TARGETS",
    "TOL",
    "MoeCase",
    "assert_moe_parity",
    "build_moe",
    "load_model",
    "logits",
    "make_moe_case",
    "moe_peft",
    "pytest",
    "run_cli",
    "sample_ids",
    "wrappers",
]
