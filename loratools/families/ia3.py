"""PEFT (IA)³: a learned vector ``ia3_l`` scales the weight per input column (feed-forward modules,
``ia3_l`` (1, in)) or per output row (other modules, ``ia3_l`` (out, 1); the base bias is scaled too).
Conv vectors carry trailing 1s. Checked in peft/tuners/ia3/layer.py (``update_layer``, ``merge``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratools.errors import ShapeError
from loratools.families.base import FamilyModule


@dataclass(eq=False)
class IA3Module(FamilyModule):
    """(IA)³: ``vector`` as stored, ``feedforward`` says which side it scales."""

    vector: torch.Tensor
    feedforward: bool = False
    kind: str = "linear"
    fan_in_fan_out: bool = False
    weight_shape: tuple[int, ...] | None = None

    family = "ia3"
    label = "(IA)³"
    multiplicative = True

    def __post_init__(self) -> None:
        super().__post_init__()
        v = self.vector
        conv = self.kind == "conv"  # PEFT: Linear (1, in) or (out, 1); conv (1, in or out, 1, 1)
        side = 1 if self.feedforward or conv else 0
        if v.ndim < 2 or any(d != 1 for i, d in enumerate(v.shape) if i != side):
            want = f"(1, {'in' if self.feedforward else 'out'}, 1, 1)" if conv else (
                "(1, in)" if self.feedforward else "(out, 1)")
            raise ShapeError(f"ia3_l has shape {list(v.shape)}; expected {want}")

    @property
    def rank(self) -> int:
        return 1

    @property
    def in_features(self) -> int | None:
        return int(self.vector.numel()) if self.feedforward else None

    @property
    def out_features(self) -> int | None:
        return None if self.feedforward else int(self.vector.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.vector}

    def describe(self) -> dict[str, object]:
        return {"side": "input" if self.feedforward else "output"}

    def merged_matrix(self, base2d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = base2d.to(dtype)
        v = self.vector.to(dtype).reshape(-1)
        if not self.feedforward:
            return w * v.reshape(-1, 1)
        return (w.reshape(w.shape[0], v.numel(), -1) * v.reshape(1, -1, 1)).reshape(w.shape)

    def bias_factor(self) -> torch.Tensor | None:
        return None if self.feedforward else self.vector.reshape(-1)
