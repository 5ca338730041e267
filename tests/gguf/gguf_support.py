"""Shared helpers for the GGUF tests: fixture paths, the converter's rewrites as an independent oracle,
and the llama.cpp runtime's ΔW rule rebuilt from a written GGUF adapter with the gguf package's reader."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
FIXTURES = ROOT / "fixtures"
GGUF = FIXTURES / "gguf"
sys.path.insert(0, str(TESTS))
from models import run_cli  # noqa: E402, F401 - one CLI runner for every test folder

warnings.filterwarnings("ignore", category=FutureWarning)


def llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute, as its formula reads (written here, not imported)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, str]]]:
    """(fields as plain values, tensors as fp32 arrays in PyTorch layout + type name) via gguf.GGUFReader."""
    import gguf

    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {}
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = (x.reshape(tuple(reversed(t.shape.tolist()))), t.tensor_type.name)
    return fields, tensors


def runtime_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Per base GGUF tensor, ΔW the way llama.cpp applies the adapter at user scale 1.

    llama-adapter.h get_scale: alpha ? alpha / rank : 1, rank = lora_b's ne[0] (its PyTorch last dim).
    llama-graph.cpp build_lora_mm: y += scale * b @ (a @ x); build_inp_embd: rows of a by token, @ b^T.
    """
    fields, tensors = read_gguf(path)
    alpha = float(fields.get("adapter.lora.alpha", 0.0))
    out = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        a = torch.from_numpy(tensors[name][0]).double()
        b = torch.from_numpy(tensors[base + ".lora_b"][0]).double()
        scale = alpha / b.shape[1] if alpha else 1.0
        out[base] = scale * (a @ b.T if base == "token_embd.weight" else b @ a)
    return out


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")
