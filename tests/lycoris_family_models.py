"""A tiny UNet stand-in for LyCORIS tests: kohya-style names (``lora_unet_…``) come from its module paths."""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(8, 12, 3, padding=1)
        self.to_q = nn.Linear(12, 16, bias=False)
        self.to_k = nn.Linear(12, 16, bias=False)
        self.ff = nn.Linear(16, 24)
        self.proj_out = nn.Conv2d(24, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)  # (b, 12, H, W)
        t = h.flatten(2).transpose(1, 2)
        t = self.ff(self.to_q(t) * torch.tanh(self.to_k(t)))
        h = t.transpose(1, 2).reshape(x.shape[0], 24, *x.shape[2:])
        return self.proj_out(h)


class TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.down_blocks:
            x = x + b(x)
        return x


def tiny_unet(seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    return TinyUNet().eval()
