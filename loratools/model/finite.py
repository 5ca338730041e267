"""NaN/Inf checks on tensors and whole adapters: one place for the refusal and its message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter


def finite_number(value: object) -> bool:
    """A config or metadata value that is a finite int or float (not a bool, a string or None)."""
    import math

    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def first_nonfinite(t: torch.Tensor) -> list[int] | None:
    """The index of the first NaN/Inf entry of a float tensor, or None when all are finite."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return None
    x = t if t.element_size() > 1 else t.float()  # isfinite has no fp8 kernels
    if bool(torch.isfinite(x).all()):
        return None
    return [int(i) for i in (~torch.isfinite(x)).nonzero()[0].tolist()]


def require_finite(t: torch.Tensor, tensor: str, where: str | Path, *, hint: str | None = None) -> None:
    """Raise :class:`NumericError` naming ``where`` (a file), ``tensor`` and the first NaN/Inf index."""
    from loratools.errors import NumericError

    first = first_nonfinite(t)
    if first is not None:
        x = t if t.element_size() > 1 else t.float()
        raise NumericError(
            f"{where}: tensor {tensor} holds NaN/Inf values (first at index {first}: {float(x[tuple(first)])})",
            hint=hint or "the training run diverged or the file is damaged; nothing was written",
            path=where,
        )


def check_tensors(
    adapter: Adapter, where: str | Path, read: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """Refuse non-float LoRA tensors and NaN/Inf anywhere in ``adapter``, naming ``where`` and the tensor.

    ``read`` turns a stored tensor into its values (merge passes one that reads data-less placeholders
    back from the file, so only one tensor is in memory at a time).
    """
    from loratools.errors import ValidationError

    read = read or (lambda t: t)
    for name, m in adapter.modules.items():
        roles = (
            (("lora_A", m.down), ("lora_B", m.up), ("magnitude", m.magnitude), ("bias", m.bias))
            if hasattr(m, "down")
            else tuple(m.tensors().items())  # another family (LoHa, LoKr, OFT, ...): its own tensor names
        )
        for role, t in roles:
            if t is None:
                continue
            if not t.is_floating_point():
                dtype = str(t.dtype).removeprefix("torch.")
                raise ValidationError(
                    f"{where}: tensor {name}.{role} is {dtype}; LoRA tensors must be floating point",
                    hint="the file is damaged or not a LoRA adapter; re-export it from its training tool",
                    path=where,
                )
            require_finite(read(t), f"{name}.{role}", where)
    for key, t in adapter.replacements.items():
        require_finite(read(t), key, where)
