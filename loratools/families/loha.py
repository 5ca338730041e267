"""LoHa (LyCORIS / PEFT): ΔW = s · (W1a·W1b) ⊙ (W2a·W2b), s = alpha / r.

Linear and plain conv: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·kh·kw), the same for ``w2``. Tucker
conv: ``hada_t1`` (r, r, kh, kw), ``hada_w1_a`` (r, out), ``hada_w1_b`` (r, in) and
W1[p, c, k, l] = Σ_ij t1[i, j, k, l]·w1_a[i, p]·w1_b[j, c] (the same for W2). Rules checked in
peft/tuners/loha/layer.py (``make_weight``/``make_weight_cp``) and lycoris/modules/loha.py +
lycoris/functional/loha.py (``_diff_weight``). The Hadamard product of a rank-r1 and a rank-r2 matrix
is exactly the rank ≤ r1·r2 product of their row-wise Khatri–Rao factors (see :meth:`LoHaModule.lowrank`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratools.errors import ShapeError
from loratools.families.base import FamilyModule, require_ndim, scale_of


def _half(
    a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Hadamard half as (U: out×r, V: r×in·kk) with half = U·V."""
    a, b = a.to(dtype), b.to(dtype)
    if t is None:
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    v = torch.einsum("ij...,jc->ic...", t.to(dtype), b)  # (r, in, kh, kw)
    return a.T, v.reshape(v.shape[0], -1)


@dataclass(eq=False)
class LoHaModule(FamilyModule):
    """A LoHa update; ``alpha`` None or 0 means alpha = r (scale 1)."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind: str = "linear"
    weight_shape: tuple[int, ...] | None = None
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"

    family = "loha"
    label = "LoHa"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.t1 is None) != (self.t2 is None):
            raise ShapeError("LoHa: hada_t1 and hada_t2 come together")
        for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):  # (out|r, r|in·k·k); Tucker: (r, out|in)
            require_ndim(self.tensors()[role], role, (2,))
        for i, (a, b, t) in enumerate(((self.w1a, self.w1b, self.t1), (self.w2a, self.w2b, self.t2)), 1):
            if t is None:
                continue
            require_ndim(t, f"hada_t{i}", 3)
            if (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]):
                raise ShapeError(
                    f"LoHa: hada_t{i} {list(t.shape)} does not fit hada_w{i}_a {list(a.shape)} and "
                    f"hada_w{i}_b {list(b.shape)} (Tucker: core (r, r, k, k), factors (r, out) and (r, in))"
                )
        u1, v1 = _half(self.w1a, self.w1b, self.t1, torch.float32) if self.t1 is None else (None, None)
        if u1 is not None and (u1.shape[1] != v1.shape[0] or self.w2a.shape[-1] != self.w2b.shape[0]):
            raise ShapeError(
                f"LoHa: rank mismatch (hada_w1_a {tuple(self.w1a.shape)}, hada_w1_b {tuple(self.w1b.shape)}, "
                f"hada_w2_a {tuple(self.w2a.shape)}, hada_w2_b {tuple(self.w2b.shape)})"
            )
        if self.t1 is not None and self.weight_shape is None:
            self.weight_shape = (int(self.w1a.shape[1]), int(self.w1b.shape[1]), *self.t1.shape[2:])
        s1, s2 = self._half_shape(1), self._half_shape(2)
        if s1 != s2:
            raise ShapeError(f"LoHa: the two Hadamard halves are {s1} and {s2}; they must match")
        self.check_magnitude()

    def _half_shape(self, i: int) -> tuple[int, int]:
        a, b, t = (self.w1a, self.w1b, self.t1) if i == 1 else (self.w2a, self.w2b, self.t2)
        if t is None:
            return int(a.shape[0]), int(b[0].numel())
        return int(a.shape[1]), int(b.shape[1]) * int(t[0, 0].numel())

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def rank2(self) -> int:
        return int(self.w2b.shape[0])

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank)

    @property
    def shape2d(self) -> tuple[int, int]:
        return self._half_shape(1)

    @property
    def is_low_rank(self) -> bool:
        return self.magnitude is None

    @property
    def max_rank(self) -> int:
        out, inn = self.shape2d
        return min(self.rank * self.rank2, out, inn)

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        for k, v in (("hada_t1", self.t1), ("hada_t2", self.t2), ("dora_scale", self.magnitude)):
            if v is not None:
                t[k] = v
        return t

    def describe(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "tucker": self.tucker,
            "exact_lora_rank": self.max_rank,
        }

    def matrix(self, base2d: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        u1, v1 = _half(self.w1a, self.w1b, self.t1, dtype)
        u2, v2 = _half(self.w2a, self.w2b, self.t2, dtype)
        return (u1 @ v1) * (u2 @ v2) * self.scale

    def lowrank(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise Khatri–Rao factors: B[:, (i,j)] = U1[:, i]·U2[:, j], A[(i,j), :] = V1[i]·V2[j]."""
        u1, v1 = _half(self.w1a, self.w1b, self.t1, dtype)
        u2, v2 = _half(self.w2a, self.w2b, self.t2, dtype)
        up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1) * self.scale
        down = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
        return up, down
