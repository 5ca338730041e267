"""The arithmetic ggml's K-quant reference quantizers share (``ggml/src/ggml-quants.c``), vectorised across blocks
in numpy float32 for :mod:`.kquant_encode` and :mod:`.kquant_low`: ``nearest_int``, sums in the C loop's order,
the first-maximum search, F16 rounding, and ``make_qkx2_quants`` (Q4_K, Q5_K, Q2_K). The notes on exactness are
in :mod:`.kquant_encode`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: values per super-block
QK_K = 256
#: ggml's GROUP_MAX_EPS: a block whose largest |value| is below it is all zeros
EPS = 1e-15


def f32(v: float) -> np.float32:
    import numpy as np

    return np.float32(v)


def nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even for |f| ≤ 2²², int32."""
    import numpy as np

    v = (f + f32(12582912.0)).view(np.int32)
    return (v & 0x007FFFFF) - 0x00400000


def seq_sum(a: np.ndarray) -> np.ndarray:
    """``float s = 0; for i: s += a[i]`` per column of ``a`` (element, block): row after row, then ``+ 0`` for
    the C sum's starting +0 (a column of −0 sums to +0 in C)."""
    import numpy as np

    return np.add.reduce(a, axis=0) + f32(0.0)


@functools.cache
def einsum_is_c() -> bool:
    """Whether ``np.einsum('ij,ij->j')`` and ``('ij,ij,ij->j')`` sum each column row after row from +0 with every
    product rounded, ``(a·b)·c`` in that order (no fused multiply-add, which numpy may use on other builds and
    CPUs): tested once on values where a fused or reordered sum would differ. They are ~2× a multiply then a
    reduce (one pass, no temporary)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for shape in ((32, 1032), (16, 40), (32, 8)):
        a, b, c = ((rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, shape))).astype(np.float32) for _ in "abc")
        want2, want3 = seq_sum(a * b), seq_sum(a * b * c)
        if not (
            np.array_equal(np.einsum("ij,ij->j", a, b, optimize=False), want2)
            and np.array_equal(np.einsum("ij,ij,ij->j", a, b, c, optimize=False), want3)
        ):
            return False
    return True


def dot_sum(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """``float s = 0; for i: s += a[i]*b[i]`` (or ``a[i]*b[i]*c[i]``) per column: one einsum where it is C's
    arithmetic (:func:`einsum_is_c`), else the products and :func:`seq_sum`."""
    import numpy as np

    if einsum_is_c():
        if c is None:
            return np.einsum("ij,ij->j", a, b, optimize=False)
        return np.einsum("ij,ij,ij->j", a, b, c, optimize=False)
    return seq_sum(a * b if c is None else a * b * c)


def first_abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``for i: if (fabsf(x[i]) > amax) {amax = fabsf(x[i]); max = x[i];}`` from amax = max = 0, per column:
    (amax, max). From the column's max and min (two fast reductions; an argmax over axis 0 costs ~25 passes):
    the larger in magnitude is the one; a tie of +a and −a (a > 0) takes the first, found in those columns
    alone; amax = 0 leaves max = +0."""
    import numpy as np

    hi, lo = x.max(axis=0), x.min(axis=0)
    neg_lo = -lo
    amax = np.maximum(hi, neg_lo)
    mx = np.where(hi > neg_lo, hi, lo)
    tie = np.flatnonzero((hi == neg_lo) & (hi > 0))
    if tie.size:
        sub = x[:, tie]
        first = np.argmax(np.abs(sub), axis=0)  # the first maximal index, as the strict '>' keeps
        mx[tie] = sub[first, np.arange(tie.size)]
    mx[amax == 0] = 0.0
    return amax, mx


def to_f16_f32(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 bits as uint16, the float16 value back in float32): ``GGML_FP32_TO_FP16`` rounds to nearest even."""
    import numpy as np

    h = v.astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


def columns(x: np.ndarray, n: int) -> np.ndarray:
    """Super-blocks (nb, 256) as sub-blocks of ``n`` laid out (element, sub-block), sub-block = i·(256/n) + j."""
    import numpy as np

    return np.ascontiguousarray(x.reshape(-1, n).T)


def keep_columns(q: np.ndarray, L: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``where(keep, L, q)`` per column into ``q``, for a ``keep`` that is rarely true: a copy of those columns
    (a select broadcast from a column mask costs ~10 plain passes)."""
    import numpy as np

    idx = np.flatnonzero(keep)
    if idx.size:
        q[:, idx] = L[:, idx]
    return q


def nearest_clip(f: np.ndarray, lo: int, hi: int, exact: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(f)))`` as float32. For |f| ≤ 2²² (every finite scale here keeps |f| within
    a few times nmax) the bit trick rounds half to even, as ``rint`` does, and clamping to integer bounds before
    or after rounding is the same: 2 passes. A zero may come out as −0, which no sum or product here tells from
    +0 (``seq_sum`` ends on ``+ 0``). ``exact`` (a scale that overflowed: inf/NaN lanes) takes ggml's bit trick
    itself. Computed in ``out`` if given, else in ``f`` itself."""
    import numpy as np

    v = f if out is None else out
    if exact:
        v[...] = np.clip(nearest_int(f), lo, hi)
        return v
    np.clip(f, f32(lo), f32(hi), out=v)  # clip, then round: the same for integer bounds, and no ±0 left
    return np.rint(v, out=v)  # half to even, as the bit trick for |f| < 2²²


def make_qkx2(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` per column of ``x`` (element, sub-block) with weights ``w``: (scale, the_min, L).

    Speed (every pass over (32, columns) counts; a masked copy broadcast from a column mask costs ~10 passes):
    a candidate's L is not kept; the step's iscale and min that made the best one are, and L is made again
    from them once at the end (the same float ops, so the same values); ``x − min`` is made afresh at each step
    (a step almost always moves some column's min) rather than updated under a mask. Few arrays: a chunk's
    working set stays in L2."""
    import numpy as np

    mn, mx = x.min(axis=0), x.max(axis=0)
    sum_w = np.add.reduce(w, axis=0)  # C starts from element 0, not from 0
    sum_x = np.add.reduce(w * x, axis=0)
    mn = np.where(mn > 0, f32(0.0), mn)
    flat, flat_min = mx == mn, -mn
    fmax, f_rmin, f_rdelta = f32(nmax), f32(rmin), f32(rdelta)
    buf, q = np.empty_like(x), np.empty_like(x)  # few arrays: the working set stays in L2

    def diff_sum(scale: np.ndarray, low: np.ndarray, q: np.ndarray) -> np.ndarray:
        diff = np.multiply(scale, q, out=buf)
        np.add(diff, low, out=diff)
        np.subtract(diff, x, out=diff)
        if use_mad:
            return dot_sum(w, np.abs(diff, out=diff))  # cur_error += w * fabsf(diff)
        return dot_sum(diff, diff, w)  # cur_error += w * (diff * diff)

    with np.errstate(all="ignore"):
        iscale = fmax / (mx - mn)
    exact = not np.isfinite(iscale[~flat]).all()  # a range so small that nmax/range overflows
    scale = f32(1.0) / iscale
    best_iscale, best_mn = iscale, mn  # what the best L is made from: nearest_clip(best_iscale · (x − best_mn))
    best = diff_sum(scale, mn, nearest_clip(np.multiply(np.subtract(x, mn, out=q), iscale, out=q), 0, nmax, exact))
    rng = mx - mn
    for step in range(nstep + 1):
        iscale = (f_rmin + f_rdelta * f32(step) + fmax) / rng
        nearest_clip(np.multiply(np.subtract(x, mn, out=q), iscale, out=q), 0, nmax, exact)
        sum_l, sum_l2, sum_xl = dot_sum(w, q), dot_sum(w, q, q), dot_sum(w, q, x)  # w*l, w*l*l, w*l*x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        if pos.any():
            this_min = np.where(pos, f32(0.0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = diff_sum(this_scale, this_min, q)
        take = (D > 0) & (cur < best)
        if not take.any():
            continue
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        best_iscale, best_mn = np.where(take, iscale, best_iscale), np.where(take, mn, best_mn)
        mn = np.where(take, this_min, mn)
        rng = mx - mn
    best_iscale = np.where(flat, f32(0.0), best_iscale)  # a flat sub-block's L is all 0 (0 · (x − min) = 0)
    L = nearest_clip(np.multiply(np.subtract(x, best_mn, out=q), best_iscale, out=q), 0, nmax, exact)
    return np.where(flat, f32(0.0), scale), np.where(flat, flat_min, -mn), L


__all__ = [
    "columns",
    "dot_sum",
    "einsum_is_c",
    "f32",
    "first_abs_max",
    "keep_columns",
    "make_qkx2",
    "nearest_clip",
    "nearest_int",
    "seq_sum",
    "to_f16_f32",
]
