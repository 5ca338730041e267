"""Shared fixtures for merge/verify tests: tiny bases and PEFT adapters built from configs."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402

TOL = 1e-5


@dataclass
class Case:
    """A base checkpoint on disk, a PEFT adapter on disk, and the in-memory models they came from."""

    base: Path
    adapter: Path
    model: torch.nn.Module  # the fp32 base model
    peft: Any  # the unmerged PeftModel (over a copy of ``model``)
    kind: str


def make_case(
    root: Path,
    kind: str = "llama",
    *,
    model_kw: dict[str, Any] | None = None,
    peft_kw: dict[str, Any] | None = None,
    base_kw: dict[str, Any] | None = None,
    seed: int = 1,
    mutate: Any = None,
    save_kw: dict[str, Any] | None = None,
) -> Case:
    model = models.build_model(kind, **(model_kw or {}))
    base = models.save_base(model, root / "base", **(base_kw or {}))
    peft = models.make_peft(model, None, kind=kind, seed=seed, **(peft_kw or {}))
    if mutate is not None:
        mutate(peft)
    peft.save_pretrained(str(root / "adapter"), **(save_kw or {}))
    return Case(base, root / "adapter", model, peft, kind)


def perturb(peft: Any, suffix: str, scale: float = 0.5, seed: int = 3) -> None:
    """Randomize every parameter whose name ends with ``suffix`` (DoRA magnitudes, lora_B biases, copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if name.endswith(suffix):
                p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))


def load_merged(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    return type(model).from_pretrained(str(path), dtype=torch.float32).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    return models.outputs(model, models.sample_inputs())


def assert_parity(merged_path: Path, case: Case, tol: float = TOL) -> None:
    """Merged model == unmerged PeftModel on logits, where the adapter moves logits by >= 100x tol."""
    ref = logits(case.peft)
    base_out = logits(case.model)
    assert (ref - base_out).abs().max() >= 100 * tol, "the adapter barely changes the outputs"
    got = logits(load_merged(merged_path, case.model))
    assert (got - ref).abs().max() <= tol, float((got - ref).abs().max())


def peft_merged_state(case: Case) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in copy.deepcopy(case.peft).merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(autouse=True)
def factors_in_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every adapter tensor stays in its file until used, as real-sized factors do (tiny ones are held)."""
    from loratools.ops.merge import factors as merge_factors

    monkeypatch.setattr(merge_factors, "LAZY_MIN_BYTES", 1)
