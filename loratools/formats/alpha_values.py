"""Stored alpha values shared by the kohya and diffusers formats.

A stored ``.alpha`` of 0: sd-scripts reads it as alpha = rank (scale 1), and so does loratools; ComfyUI takes the
value as it is (``comfy/weight_adapter/lora.py``: ``alpha = v[2] / rank`` whenever an alpha was stored), so the same
file does nothing there. The reading is kept and said once per file, in ``info`` (``alpha_zero``) and a warning."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def warn_zero_alpha(weights: Path, zero: int, total: int) -> dict[str, int] | None:
    """Warn (one ``LoratoolsWarning``) when ``zero`` of ``total`` modules store ``.alpha`` = 0; the ``alpha_zero``
    record info shows, or None."""
    if not zero:
        return None
    import warnings

    from loratools.errors import LoratoolsWarning

    warnings.warn(
        f"{weights}: {zero} of {total} modules store .alpha = 0, read as alpha = rank (scale 1), sd-scripts' rule "
        "(ComfyUI applies such modules at scale 0: no effect)",
        LoratoolsWarning,
        stacklevel=3,
    )
    return {"modules": zero, "of": total}


def alpha_tensor(alpha: float, like: torch.Tensor) -> torch.Tensor:
    """alpha as a 0-d tensor in the factors' dtype when that holds it exactly, else fp32, else fp64."""
    import torch

    for dtype in (like.dtype, torch.float32, torch.float64):
        if dtype.is_floating_point and float(torch.tensor(alpha, dtype=dtype)) == alpha:
            return torch.tensor(alpha, dtype=dtype)
    return torch.tensor(alpha, dtype=torch.float64)


__all__ = ["alpha_tensor", "warn_zero_alpha"]
