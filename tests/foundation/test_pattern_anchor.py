"""Rank/alpha patterns the PEFT writer emits match their own module only (PEFT matches ``(.*\\.)?(p)$``): a
top-level ``proj_out`` beside ``blocks.0.proj_out`` (Flux has both) gets an anchored pattern, so PEFT gives each
module its own alpha and rank instead of the first pattern that ends like it."""

from __future__ import annotations

from pathlib import Path

import torch

from loratools import save_adapter
from loratools.model.adapter import Adapter, LoraModule


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"proj_out": torch.nn.Linear(8, 6)}) for _ in range(2)])
        self.proj_out = torch.nn.Linear(6, 4)


def _module(out: int, inp: int, rank: int, alpha: float) -> LoraModule:
    g = torch.Generator().manual_seed(out * 10 + rank)
    return LoraModule(down=torch.randn(rank, inp, generator=g), up=torch.randn(out, rank, generator=g), alpha=alpha)


def test_peft_gives_each_same_named_module_its_own_rank_and_alpha(tmp_path: Path) -> None:
    import peft

    adapter = Adapter(
        modules={
            "blocks.0.proj_out": _module(6, 8, 2, 3.0),
            "blocks.1.proj_out": _module(6, 8, 2, 3.0),
            "proj_out": _module(4, 6, 4, 9.0),  # other rank and alpha than the nested ones
        },
        meta={"format": "peft"},
    )
    save_adapter(adapter, tmp_path / "a", format="peft")
    model = peft.PeftModel.from_pretrained(_Net(), str(tmp_path / "a"))
    inner = model.base_model.model
    assert inner.proj_out.r["default"] == 4 and inner.proj_out.scaling["default"] == 9.0 / 4
    for block in inner.blocks:
        assert block["proj_out"].r["default"] == 2 and block["proj_out"].scaling["default"] == 3.0 / 2
