"""LoKr (LyCORIS / PEFT): ΔW = s · kron(W1, W2), reshaped to the base weight.

W1 is ``lokr_w1`` (a, c) or ``lokr_w1_a``·``lokr_w1_b``; W2 is ``lokr_w2`` (b, d[, kh, kw]) or
``lokr_w2_a``·``lokr_w2_b`` or, Tucker, ``lokr_t2`` (r, r, kh, kw) with W2[p, q, ...] =
Σ_ij t2[i, j, ...]·w2_a[i, p]·w2_b[j, q]. As an out×(in·kh·kw) matrix ΔW = s·kron(W1, W2 as b×(d·kh·kw)).
Scale: PEFT always uses alpha / r (peft/tuners/lokr/layer.py ``update_layer``); LyCORIS uses alpha / r
with r the rank of the first factored half, and 1 when both halves are full matrices (alpha ignored,
lycoris/modules/lokr.py ``__init__`` and ``make_module_from_state_dict``). σ(kron(W1, W2)) = σ(W1)⊗σ(W2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from loratools.errors import ShapeError
from loratools.families.base import FamilyModule, require_ndim


def _mat(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if full is not None:
        return full.to(dtype)
    assert a is not None and b is not None
    return a.to(dtype) @ b.to(dtype).reshape(b.shape[0], -1)


@dataclass(eq=False)
class LoKrModule(FamilyModule):
    """A LoKr update. ``r`` is the rank the scale divides by; ``rule`` picks PEFT's or LyCORIS' scale."""

    alpha: float | None = None
    r: int = 0
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    rule: Literal["peft", "lycoris"] = "peft"
    kind: str = "linear"
    weight_shape: tuple[int, ...] | None = None
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"

    family = "lokr"
    label = "LoKr"

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], **fields: Any) -> LoKrModule:
        """A module from its file tensors by their common names (``lokr_w1``, ``lokr_w1_a`` ... ``lokr_t2``), as
        PEFT and LyCORIS both store them."""
        names = ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")
        keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return cls(**{n: parts.get(k) for n, k in zip(names, keys, strict=True)}, **fields)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.w1 is None and (self.w1a is None or self.w1b is None):
            raise ShapeError("LoKr: needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if self.w2 is None and (self.w2a is None or self.w2b is None):
            raise ShapeError("LoKr: needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        # W1 is a matrix (or two); W2 a matrix, a conv kernel (b, d, kh, kw), or factors of one / a Tucker core
        for role, t, ndims in (
            ("lokr_w1", self.w1, (2,)),
            ("lokr_w1_a", self.w1a, (2,)),
            ("lokr_w1_b", self.w1b, (2,)),
            ("lokr_w2", self.w2, (2, 3, 4, 5)),
            ("lokr_w2_a", self.w2a, (2,)),
            ("lokr_w2_b", self.w2b, (2,) if self.t2 is not None else (2, 3, 4, 5)),
            ("lokr_t2", self.t2, (3, 4, 5)),
        ):
            if t is not None:
                require_ndim(t, role, ndims)
        if self.t2 is not None and (self.w2a is None or self.w2b is None or self.t2.shape[:2] != (
            self.w2a.shape[0], self.w2b.shape[0])):
            raise ShapeError("LoKr: lokr_t2 (r, r, k, k) needs lokr_w2_a (r, b) and lokr_w2_b (r, d) of the same r")
        for a, b, what in ((self.w1a, self.w1b, "w1"), (self.w2a, self.w2b, "w2")):
            if a is not None and b is not None and self.t2 is None and a.shape[1] != b.shape[0]:
                raise ShapeError(
                    f"LoKr: lokr_{what}_a {tuple(a.shape)} and lokr_{what}_b {tuple(b.shape)} differ in rank"
                )
        if self.r <= 0:
            self.r = int(self.factored_rank or 1)
        if self.weight_shape is None:
            w2 = self.w2 if self.w2 is not None else (self.t2 if self.t2 is not None else None)
            if w2 is not None and w2.ndim == 4:
                a, c = self._w1_shape
                b, d = self._w2_shape_outer
                self.weight_shape = (a * b, c * d, *w2.shape[2:])
        self.check_magnitude()

    @property
    def factored_rank(self) -> int | None:
        if self.w1a is not None:
            return int(self.w1a.shape[1])
        if self.w2a is not None:
            return int(self.w2a.shape[1] if self.t2 is None else self.w2a.shape[0])
        return None

    @property
    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return int(self.w1.shape[0]), int(self.w1.shape[1])
        return int(self.w1a.shape[0]), int(self.w1b.shape[1])

    @property
    def _w2_shape_outer(self) -> tuple[int, int]:
        """(b, d) of W2 (d without the kernel)."""
        if self.w2 is not None:
            return int(self.w2.shape[0]), int(self.w2.shape[1])
        if self.t2 is not None:
            return int(self.w2a.shape[1]), int(self.w2b.shape[1])
        return int(self.w2a.shape[0]), int(self.w2b.shape[1])

    def _w2_cols(self) -> int:
        if self.w2 is not None:
            return int(self.w2[0].numel())
        if self.t2 is not None:
            return int(self.w2b.shape[1]) * int(self.t2[0, 0].numel())
        return int(self.w2b[0].numel())

    @property
    def rank(self) -> int:
        return int(self.r)

    @property
    def scale(self) -> float:
        if self.rule == "lycoris":
            if self.w1 is not None and self.w2 is not None:
                return 1.0
            r = self.factored_rank or 1
            alpha = float(r) if not self.alpha else float(self.alpha)
            return alpha / r
        alpha = float(self.alpha) if self.alpha is not None else float(self.r)
        return alpha / self.r

    @property
    def shape2d(self) -> tuple[int, int]:
        a, c = self._w1_shape
        b = self._w2_shape_outer[0]
        return a * b, c * self._w2_cols()

    @property
    def is_low_rank(self) -> bool:
        return self.magnitude is None

    @property
    def max_rank(self) -> int:
        a, c = self._w1_shape
        b, cols = self._w2_shape_outer[0], self._w2_cols()
        r1 = min(a, c) if self.w1 is not None else min(a, c, int(self.w1a.shape[1]))
        r2 = (
            min(b, cols)
            if self.w2 is not None
            else min(b, cols, int(self.w2a.shape[1] if self.t2 is None else self.w2a.shape[0]))
        )
        out, inn = self.shape2d
        return min(r1 * r2, out, inn)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = {
            "lokr_w1": self.w1,
            "lokr_w1_a": self.w1a,
            "lokr_w1_b": self.w1b,
            "lokr_w2": self.w2,
            "lokr_w2_a": self.w2a,
            "lokr_w2_b": self.w2b,
            "lokr_t2": self.t2,
            "dora_scale": self.magnitude,
        }
        return {k: v for k, v in names.items() if v is not None}

    def describe(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "w1": list(self._w1_shape),
            "w2": [self._w2_shape_outer[0], self._w2_cols()],
            "exact_lora_rank": self.max_rank,
        }

    def halves(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1, W2) as matrices (W2 as b×(d·kh·kw)), scale not applied."""
        w1 = _mat(self.w1, self.w1a, self.w1b, dtype)
        if self.t2 is not None:
            w2 = torch.einsum("ij...,ip,jq->pq...", self.t2.to(dtype), self.w2a.to(dtype), self.w2b.to(dtype))
        else:
            w2 = _mat(self.w2, self.w2a, self.w2b, dtype)
        return w1, w2.reshape(w2.shape[0], -1)

    def matrix(self, base2d: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w1, w2 = self.halves(dtype)
        return torch.kron(w1, w2) * self.scale

    def lowrank(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """kron(U1Σ1, U2Σ2)·kron(V1ᵀ, V2ᵀ) from the SVDs of the halves; columns by falling σ1·σ2."""
        w1, w2 = self.halves(torch.float64)
        u1, s1, v1 = torch.linalg.svd(w1, full_matrices=False)
        u2, s2, v2 = torch.linalg.svd(w2, full_matrices=False)
        k1, k2 = _numerical_rank(s1), _numerical_rank(s2)
        u1, s1, v1, u2, s2, v2 = u1[:, :k1], s1[:k1], v1[:k1], u2[:, :k2], s2[:k2], v2[:k2]
        up = torch.kron(u1 * s1, u2 * s2) * self.scale
        down = torch.kron(v1, v2)
        order = torch.argsort(torch.outer(s1, s2).reshape(-1), descending=True)
        return up[:, order].to(dtype), down[order].to(dtype)


def _numerical_rank(s: torch.Tensor) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(s.shape[0], 1) * torch.finfo(torch.float64).eps
    return int((s > tol).sum())
