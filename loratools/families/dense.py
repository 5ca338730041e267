"""The exact ΔW of any module (LoRA, DoRA or another family) as a dense fp64 out×in matrix.

The generic path of ``diff`` and of ``convert --as-lora`` for updates that are not low-rank on their own
(OFT, BOFT, IA3, DoRA, LyCORIS weight decomposition): those need the base weight, given in its own layout.
"""

from __future__ import annotations

from typing import Any

import torch

from loratools.errors import UsageError


def needs_base(m: Any) -> bool:
    return bool(getattr(m, "needs_base", False))


def delta_matrix(m: Any, base_weight: torch.Tensor | None = None, name: str = "module") -> torch.Tensor:
    """ΔW = W' − W of module ``m`` as an fp64 out×in matrix; ``base_weight`` (base layout) when it needs one."""
    if needs_base(m) and base_weight is None:
        raise UsageError(
            f"module {name}: its {'DoRA' if hasattr(m, 'down') else m.label} update depends on the base weight",
            hint="pass the base model (--base BASE)",
        )
    if hasattr(m, "down"):  # LoRA / DoRA
        up, down = m.factors(torch.float64)
        d = (up * m.scale) @ down
        if m.magnitude is None:
            return d
        w = m.from_weight_layout(base_weight).to(torch.float64)
        merged = w + d
        merged = merged * (m.magnitude.to(torch.float64).reshape(-1, 1) / merged.norm(dim=1, keepdim=True))
        return merged - w
    if needs_base(m):
        w = m.from_weight_layout(base_weight).to(torch.float64)
        return m.merged_matrix(w, torch.float64) - w
    return m.matrix(None, torch.float64)
