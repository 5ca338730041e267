"""PEFT families on conv layers (plain and Tucker/effective-conv2d): our ΔW against PEFT's own layers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from loratools import load_adapter


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(8, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 8, 1)
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.c2(self.c1(x)).mean(dim=(2, 3)))


def _configs():
    from peft import IA3Config, LoHaConfig, LoKrConfig, OFTConfig

    t = ["c1", "c2"]
    return {
        "loha": LoHaConfig(r=2, alpha=3, target_modules=t, init_weights=False),
        "loha-tucker": LoHaConfig(r=2, alpha=5, target_modules=t, init_weights=False, use_effective_conv2d=True),
        "lokr-tucker": LoKrConfig(
            r=2, alpha=3, target_modules=t, init_weights=False, use_effective_conv2d=True, decompose_both=True
        ),
        "lokr": LoKrConfig(r=1, alpha=3, target_modules=t, init_weights=False),
        "oft": OFTConfig(r=0, oft_block_size=4, target_modules=["c2"], init_weights=False),
        "ia3": IA3Config(target_modules=t, feedforward_modules=["c2"], init_ia3_weights=False),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_conv_families_merge_like_peft(name, tmp_path: Path):
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    base = _Convs().eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base), _configs()[name]).eval()
    pm.save_pretrained(str(tmp_path / "a"))
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).merge_and_unload().state_dict()
    adapter = load_adapter(tmp_path / "a")
    assert adapter.modules
    for mod, m in adapter.modules.items():
        w = state[mod + ".weight"]
        assert float((merged[mod + ".weight"] - w).abs().max()) > 1e-3
        ours = m.merged(w).reshape(w.shape) if m.needs_base else w + m.delta().reshape(w.shape)
        torch.testing.assert_close(ours, merged[mod + ".weight"], atol=1e-5, rtol=0)
        if name == "ia3" and not m.feedforward:
            torch.testing.assert_close(state[mod + ".bias"] * m.bias_factor(), merged[mod + ".bias"])


@pytest.mark.parametrize(
    "kw",
    [
        {"block_share": True, "oft_block_size": 4, "r": 0},
        {"coft": True, "eps": 1e-2, "oft_block_size": 4, "r": 0},
        {"use_cayley_neumann": True, "num_cayley_neumann_terms": 3, "oft_block_size": 2, "r": 0},
    ],
    ids=["block_share", "coft", "neumann3"],
)
def test_oft_variants_merge_like_peft(kw, tmp_path: Path):
    from peft import OFTConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = _Convs().eval()
    torch.manual_seed(2)
    pm = get_peft_model(copy.deepcopy(base), OFTConfig(target_modules=["lin"], init_weights=False, **kw)).eval()
    pm.save_pretrained(str(tmp_path / "a"))
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).merge_and_unload().state_dict()
    m = load_adapter(tmp_path / "a").modules["lin"]
    w = base.state_dict()["lin.weight"]
    assert float((merged["lin.weight"] - w).abs().max()) > 1e-3
    torch.testing.assert_close(m.merged(w), merged["lin.weight"], atol=1e-5, rtol=0)
