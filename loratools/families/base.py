"""The interface every non-LoRA update shares (LoHa, LoKr, OFT, BOFT, IA3, LyCORIS diag-OFT).

A family module knows its layer kind, the base weight's layout, its parameter count and whether its
update is exactly low-rank. :meth:`FamilyModule.delta` returns ΔW in the base weight's layout;
families whose update depends on the base weight (``needs_base``: OFT, BOFT, IA3, and LoHa/LoKr with a
LyCORIS ``dora_scale``) take it as ``base_weight`` and refuse without it. :meth:`FamilyModule.merged`
returns W' directly (for multiplicative families that is more exact than W + (W' − W)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from loratools.errors import ShapeError, UsageError

LAYOUT_KINDS = ("linear", "conv")


def widen_float8_fields(obj: object) -> None:
    """Replace every float8 tensor field of dataclass ``obj`` by its bf16 copy: exact (every e4m3/e5m2/e8m0 value is
    a bf16 value), and torch implements no arithmetic (``isfinite``, ``add``) for float8 on CPU. An adapter stored in
    float8 then reads, validates and merges like a bf16 one (a stranger's file: an internal error before)."""
    from dataclasses import fields

    for f in fields(obj):  # type: ignore[arg-type]
        t = getattr(obj, f.name)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.element_size() == 1:
            setattr(obj, f.name, t.to(torch.bfloat16))


@dataclass(eq=False)
class FamilyModule:
    """Base of every non-LoRA adapted module. ``weight_shape`` is the base weight's shape when known."""

    #: short machine name ("loha", "lokr", "oft", "boft", "ia3", "lycoris_oft")
    family: ClassVar[str] = ""
    #: what messages call it ("LoHa", "LoKr", ...)
    label: ClassVar[str] = ""
    #: the update is W-dependent: delta() needs the base weight
    multiplicative: ClassVar[bool] = False

    # LoRA-only attributes, read by code that lists every module (info, validate): never set here
    use_rslora = False
    fan_in_fan_out = False
    bias = None
    alpha = None
    magnitude = None

    def __post_init__(self) -> None:
        widen_float8_fields(self)
        if getattr(self, "kind", "linear") not in LAYOUT_KINDS:
            raise ShapeError(f"{self.label}: unknown module kind {self.kind!r}; expected linear or conv")
        for role, t in self.tensors().items():
            if t.numel() == 0:
                raise ShapeError(f"{role} has shape {list(t.shape)}: it is empty (rank 0?)")

    def check_magnitude(self) -> None:
        """A LyCORIS ``dora_scale`` is (out, 1, …) or (1, in, …) with one entry per output row / input channel."""
        m = getattr(self, "magnitude", None)
        if m is None:
            return
        out, inn = self.shape2d or (None, None)
        shape = list(m.shape)
        axis = getattr(self, "magnitude_axis", "out")
        rest = shape[2:] if axis == "in" else shape[1:]
        if len(shape) < 2 or any(d != 1 for d in rest) or (axis == "in" and shape[0] != 1):
            raise ShapeError(f"dora_scale has shape {shape}; expected ({out}, 1, ...) or (1, in channels, ...)")
        if axis == "out" and out is not None and shape[0] != out:
            raise ShapeError(f"dora_scale has {shape[0]} rows but the update has {out} outputs")
        n_in = shape[1] if axis == "in" else 0
        if axis == "in" and inn is not None and (inn % n_in or (len(shape) == 2 and n_in != inn)):
            raise ShapeError(f"dora_scale has {n_in} input channels but the update has {inn} inputs")

    # -- shape ---------------------------------------------------------------------------------
    @property
    def shape2d(self) -> tuple[int, int] | None:
        """(out, in·k·k) of the update as a matrix, when the tensors alone tell it."""
        return None

    @property
    def out_features(self) -> int | None:
        s = self.shape2d
        return s[0] if s else None

    @property
    def in_features(self) -> int | None:
        s = self.shape2d
        return s[1] if s else None

    @property
    def transposed(self) -> bool:
        return bool(getattr(self, "fan_in_fan_out", False))

    @property
    def needs_base(self) -> bool:
        """True when ΔW depends on the base weight (pass it to :meth:`delta`)."""
        return self.multiplicative or getattr(self, "magnitude", None) is not None

    @property
    def scale(self) -> float | None:
        """The multiplier of an additive family (alpha / r); None for multiplicative ones."""
        return None

    @property
    def is_low_rank(self) -> bool:
        """True when ΔW has an exact low-rank form without the base (LoHa, LoKr)."""
        return False

    @property
    def rank(self) -> int:
        """The family's own rank parameter (LoHa/LoKr r; OFT block count; IA3 1)."""
        return 0

    @property
    def max_rank(self) -> int | None:
        """Upper bound of rank(ΔW) from the structure (None: up to full rank)."""
        return None

    @property
    def parameters(self) -> int:
        return int(sum(t.numel() for t in self.tensors().values()))

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        """Why a base weight of ``shape`` cannot take this update (None when it fits)."""
        if not shape or len(shape) < 2:
            return f"expects a weight matrix, the base tensor has shape {list(shape)}"
        rows = shape[1] if self.transposed and len(shape) == 2 else shape[0]
        cols = shape[0] if self.transposed and len(shape) == 2 else math.prod(shape[1:])
        out, inn = self.out_features, self.in_features
        if (out is not None and out != rows) or (inn is not None and inn != cols):
            return f"expects a {out or '?'}x{inn or '?'} weight, the base tensor is {list(shape)}"
        block = getattr(self, "block_size", None)
        if block and cols % block:
            return f"blocks of {block} do not tile the {cols} inputs of a base weight of shape {list(shape)}"
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's own tensors by role (for counting, dtype and finiteness checks)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Family-specific facts for ``info`` (JSON-able)."""
        return {}

    # -- layout --------------------------------------------------------------------------------
    def to_weight_layout(self, matrix: torch.Tensor, weight_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """An out×in matrix in the base weight's layout (transposed for Conv1D, reshaped for conv)."""
        if self.transposed:
            return matrix.T.contiguous()
        shape = weight_shape or getattr(self, "weight_shape", None)
        if shape is not None and len(shape) != 2:
            return matrix.reshape(shape)
        return matrix

    def from_weight_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """A base-layout weight as an out×in matrix."""
        if self.transposed:
            return weight.T
        return weight.reshape(weight.shape[0], -1)

    def _base2d(self, base_weight: torch.Tensor | None, name: str = "this module") -> torch.Tensor:
        if base_weight is None:
            raise UsageError(
                f"{name}: a {self.label} update depends on the base weight; pass base_weight",
                hint="give the base model (--base BASE)",
            )
        w = self.from_weight_layout(base_weight).to(
            torch.float64 if base_weight.dtype == torch.float64 else torch.float32
        )
        s = self.shape2d
        if s is not None and tuple(w.shape) != tuple(s):
            raise ShapeError(f"{self.label} update is {s[0]}x{s[1]} but the base weight is {tuple(base_weight.shape)}")
        return w

    # -- maths ---------------------------------------------------------------------------------
    def matrix(self, base2d: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW as an out×in matrix (additive families ignore ``base2d``; multiplicative ones need it)."""
        if not self.multiplicative:
            raise NotImplementedError
        if base2d is None:
            self._base2d(None)
        assert base2d is not None
        return self.merged_matrix(base2d, dtype) - base2d.to(dtype)

    def merged_matrix(self, base2d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W' as an out×in matrix; additive families: W + ΔW (with LyCORIS weight decomposition if any)."""
        w = base2d.to(dtype)
        merged = w + self.matrix(w, dtype)
        mag = getattr(self, "magnitude", None)
        if mag is not None:
            merged = _weight_decompose(merged, mag.to(dtype), getattr(self, "magnitude_axis", "out"))
        return merged

    def delta(
        self,
        base_weight: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """ΔW in the base weight's layout, computed in ``dtype``; ``base_weight`` when :attr:`needs_base`."""
        shape = tuple(base_weight.shape) if base_weight is not None else None
        if self.needs_base:
            w = self._base2d(base_weight).to(dtype)
            if device is not None:
                w = w.to(device)
            out = self.merged_matrix(w, dtype) - w
        else:
            out = self.matrix(None, dtype)
            if device is not None:
                out = out.to(device)
        return self.to_weight_layout(out, shape)

    def merged(self, base_weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W' (base plus this update) in the base weight's layout, in ``dtype`` (not cast back)."""
        w = self._base2d(base_weight).to(dtype)
        return self.to_weight_layout(self.merged_matrix(w, dtype), tuple(base_weight.shape))

    def bias_factor(self) -> torch.Tensor | None:
        """A per-output factor the base *bias* is multiplied by when merging (IA3 output side), else None."""
        return None

    def lowrank(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``(B, A)`` with ΔW = B·A (scale folded in), for :attr:`is_low_rank` families."""
        raise UsageError(f"a {self.label} update has no low-rank form without the base weight")


def _weight_decompose(merged: torch.Tensor, magnitude: torch.Tensor, axis: str) -> torch.Tensor:
    """LyCORIS' weight decomposition: W' = m · W / (‖W‖ + eps), norms per output row or input column."""
    eps = torch.finfo(merged.dtype).eps
    if axis == "out":
        norm = merged.norm(dim=1, keepdim=True) + eps
        return merged * (magnitude.reshape(-1, 1) / norm)
    n_in = magnitude.numel()  # conv: columns are (in, kh, kw); the norm runs over out and the kernel
    grouped = merged.reshape(merged.shape[0], n_in, -1)
    norm = grouped.norm(dim=(0, 2), keepdim=True) + eps
    return (grouped * (magnitude.reshape(1, n_in, 1) / norm)).reshape(merged.shape)


def require_ndim(t: torch.Tensor, role: str, ndims: tuple[int, ...] | int) -> None:
    """ShapeError naming ``role`` unless ``t`` has one of ``ndims`` dimensions (an int: at least that many)."""
    ok = t.ndim >= ndims if isinstance(ndims, int) else t.ndim in ndims
    if not ok:
        want = f"at least {ndims}" if isinstance(ndims, int) else " or ".join(str(n) for n in ndims)
        raise ShapeError(f"{role} has shape {list(t.shape)}; expected {want} dimensions")


def scale_of(alpha: float | None, rank: int) -> float:
    """LyCORIS/PEFT alpha rule: ``alpha / r``; alpha None or 0 means alpha = r."""
    if rank <= 0:
        return 0.0
    a = float(rank) if alpha is None or alpha == 0 or not math.isfinite(alpha) else float(alpha)
    return a / rank
