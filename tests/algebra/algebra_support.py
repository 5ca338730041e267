"""Fixtures for the low-rank algebra tests: tiny models and adapters with non-trivial spectra.

Every adapter here has B columns scaled by a decaying profile, so σ are distinct and spread over more
than a decade (the selection rules then have something to select), and alpha ≠ r.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402


def shape_spectrum(peft_model: torch.nn.Module, seed: int = 0) -> None:
    """Scale lora_B / lora_embedding_B column i by decay^i (decay and a factor drawn per module)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ("lora_B" in name or "lora_embedding_B" in name) and p.ndim >= 2:
                r = p.shape[1]
                decay = 0.3 + 0.6 * float(torch.rand(1, generator=g))  # per module, so ranks differ by rule
                prof = decay ** torch.arange(r, dtype=torch.float32) * (0.5 + torch.rand(1, generator=g))
                p.mul_(prof.reshape(1, r, *([1] * (p.ndim - 2))))


def make_adapter(model, path, *, kind="llama", r=8, lora_alpha=12, seed=1, **kw) -> Path:
    """A PEFT adapter saved by PEFT itself, with a decaying spectrum."""
    pm = models.make_peft(model, None, kind=kind, r=r, lora_alpha=lora_alpha, seed=seed, **kw)
    shape_spectrum(pm, seed)
    pm.save_pretrained(str(path))
    return Path(path)


class Toy(torch.nn.Module):
    """Embedding + conv + linear: the three LoRA kinds in one tiny model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(40, 12)
        self.conv = torch.nn.Conv2d(3, 10, 3, padding=1)
        self.lin = torch.nn.Linear(12, 20)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lin(self.emb(ids)).flatten(), self.conv(img).flatten()])


def toy_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 40, (2, 5), generator=g), torch.randn(1, 3, 6, 6, generator=g)


def peft_outputs(base_model: torch.nn.Module, adapter_dir: Path, inputs) -> torch.Tensor:
    """Outputs of ``PeftModel.from_pretrained(copy of base, adapter_dir)``."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).eval()
    with torch.no_grad():
        if isinstance(inputs, dict):
            return models.outputs(pm, inputs)
        return pm(*inputs)


def with_deltas(base_model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``base_model`` with dense deltas (base layout) added to ``<module>.weight``."""
    m = copy.deepcopy(base_model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            params[f"{name}.weight"].add_(d.to(params[f"{name}.weight"].dtype))
    return m.eval()


def best_rank(d: torch.Tensor, k: int) -> torch.Tensor:
    """Eckart–Young: the best rank-k approximation of a 2-D matrix by a dense fp64 SVD."""
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def dense(module) -> torch.Tensor:
    """The module's ΔW as an out×in fp64 matrix (the oracle's input)."""
    up, down = module.factors(torch.float64)
    return module.scale * up @ down


@pytest.fixture(scope="session")
def llama():
    return models.build_model("llama")


@pytest.fixture(scope="session")
def gpt2():
    return models.build_model("gpt2")


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("algebra")


@pytest.fixture(scope="session")
def llama_adapter(llama, work) -> Path:
    return make_adapter(llama, work / "llama_r8", r=8, lora_alpha=12)


@pytest.fixture(scope="session")
def llama_adapter_b(llama, work) -> Path:
    return make_adapter(llama, work / "llama_r6", r=6, lora_alpha=5, seed=7)


@pytest.fixture(scope="session")
def rslora_adapter(llama, work) -> Path:
    return make_adapter(llama, work / "llama_rs", r=8, lora_alpha=6, use_rslora=True, seed=2)


@pytest.fixture(scope="session")
def gpt2_adapter(gpt2, work) -> Path:
    return make_adapter(gpt2, work / "gpt2_r6", kind="gpt2", r=6, lora_alpha=9, seed=4)


@pytest.fixture(scope="session")
def toy():
    return Toy().eval()


@pytest.fixture(scope="session")
def toy_adapter(toy, work) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    cfg = LoraConfig(r=6, lora_alpha=10, target_modules=["emb", "conv", "lin"], init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(toy), cfg)
    shape_spectrum(pm, 3)
    pm.save_pretrained(str(work / "toy_r6"))
    return work / "toy_r6"


@pytest.fixture(scope="session")
def inputs():
    return models.sample_inputs()
