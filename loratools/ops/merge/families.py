"""Merging the families beyond LoRA (LoHa, LoKr, OFT, BOFT, IA3, LyCORIS diag-OFT) into a base tensor.

Additive families (LoHa, LoKr without a ``dora_scale``) add w·ΔW in fp32 like LoRA, from their own
factors (one out×in fp32 product per module, never the whole adapter). Multiplicative ones (OFT, BOFT,
IA3, diag-OFT) and LyCORIS weight decomposition compute W' from W directly; a weight other than 1 has no
meaning for them and is refused, as is sharing their tensor with another adapter (the result would
depend on the order). Non-feed-forward IA3 also scales the base bias, as PEFT's merge does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loratools.errors import ShapeError, UnsupportedError
from loratools.families import FamilyModule

if TYPE_CHECKING:
    import torch

#: a plan.Contribution / plan.TensorJob (not imported: plan imports this module)
Contribution = TensorJob = Any


def is_family(c: Contribution) -> bool:
    return isinstance(c.lora, FamilyModule)


def has_family(j: TensorJob) -> bool:
    """True when a job needs the generic (dense, per-module) path."""
    return any(isinstance(c.lora, FamilyModule) for c in (*j.deltas, *j.biases))


def _additive(m: FamilyModule) -> bool:
    return not m.needs_base


def check(j: TensorJob) -> None:
    """Shape and refusal checks of the family contributions of ``j`` (before anything is written)."""
    for c in j.deltas:
        m = c.lora
        if not isinstance(m, FamilyModule):
            continue
        if c.rows is not None:
            raise UnsupportedError(
                f"module {c.module} is {m.label}; merging it into part of the fused tensor {j.key} is not supported",
                hint="merge it into the model as a diffusers pipeline folder instead",
            )
        if not _additive(m):
            what = f"{m.label} with weight decomposition (dora_scale)" if not m.multiplicative else m.label
            if c.weight != 1:
                raise UnsupportedError(
                    f"module {c.module} is {what}; its update multiplies the weight, so weight {c.weight} "
                    "has no meaning",
                    hint="merge it with weight 1, or lower it to LoRA first: loratools convert ADAPTER --to peft "
                    "--as-lora --base BASE -o OUT",
                )
            if len(j.deltas) > 1:
                raise UnsupportedError(
                    f"module {c.module} is {what} and another adapter also changes {j.key}; the result would "
                    "depend on their order",
                    hint="merge it alone first, then merge the others into its output",
                )
        problem = m.misfit(j.shape)
        if problem is not None:
            raise ShapeError(
                f"adapter module {c.module} ({m.label}) {problem} ({j.source or j.key})",
                hint="the adapter was trained on a different model size or layout",
            )
    for c in j.biases:
        if isinstance(c.lora, FamilyModule) and c.weight != 1:
            raise UnsupportedError(f"module {c.module} is {c.lora.label}; it cannot be merged with weight {c.weight}")


def apply(c: Contribution, w: torch.Tensor) -> torch.Tensor:
    """``w`` (fp32, the base weight's layout) with the family update of ``c`` applied; may be a new tensor."""
    m: FamilyModule = c.lora  # type: ignore[assignment]
    if _additive(m):
        mat = m.from_weight_layout(w)
        mat.add_(m.matrix(None, w.dtype).to(w.device), alpha=c.weight)
        return w
    return m.merged(w, w.dtype).reshape(w.shape)


def scale_bias(c: Contribution, w: torch.Tensor) -> torch.Tensor:
    """A base bias scaled by an output-side IA3 vector."""
    factor = c.lora.bias_factor()  # type: ignore[union-attr]
    return w.mul_(factor.to(w.device, w.dtype).reshape(w.shape))
