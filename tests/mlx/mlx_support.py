"""A tiny Llama written by transformers, PEFT adapters on it (written by PEFT's save_pretrained, random non-zero B,
alpha != r, non-square targets), and mlx-lm's own loader and LoRA layers as the oracle (skipped where the mlx CPU
build does not install)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402

mx = pytest.importorskip("mlx.core", reason="the mlx CPU build is not installable on this platform")
mlx_utils = pytest.importorskip("mlx_lm.utils")
tuner = pytest.importorskip("mlx_lm.tuner.utils")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4  # two backends (torch, MLX) in fp32
IDS = [[1, 5, 9, 33, 60, 2, 17]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "patterns": dict(r=4, lora_alpha=5, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 7},
                     target_modules=[*TARGETS, "embed_tokens"]),
    "rslora": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=TARGETS),
    "dora": dict(r=2, lora_alpha=5, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}  # fmt: skip


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("mlx") / "llama"
    model.save_pretrained(str(folder))
    return folder, model


@pytest.fixture(scope="session")
def peft_adapters(llama, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    _, model = llama
    out = {}
    for name, kw in ADAPTERS.items():
        torch.manual_seed(1)
        trained = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **kw)).eval()
        with torch.no_grad():
            for n, p in trained.named_parameters():
                if "lora_magnitude_vector" in n:  # a trained magnitude, not the base's norms
                    p.mul_(1 + 0.3 * torch.rand_like(p))
        folder = tmp_path_factory.mktemp("peft") / name
        trained.save_pretrained(str(folder))
        out[name] = (folder, trained)
    return out


def torch_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def mlx_model(base: Path):  # noqa: ANN201
    model, _ = mlx_utils.load_model(Path(base))
    return model


def mlx_logits(base: Path, adapter: Path | None = None) -> np.ndarray:
    """Logits of mlx-lm's own model, with mlx-lm's own ``load_adapters`` when ``adapter`` is given."""
    model = mlx_model(base)
    if adapter is not None:
        tuner.load_adapters(model, str(adapter))
    return np.array(model(mx.array(IDS)))


__all__ = ["ADAPTERS", "TOL", "llama", "mlx_logits", "mlx_model", "models", "mx", "peft", "peft_adapters",
           "torch_logits", "tuner"]
