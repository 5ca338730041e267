"""The arithmetic ggml's K-quant reference quantizers share (``ggml/src/ggml-quants.c``), vectorised across blocks
in numpy float32 for :mod:`.kquant_encode` and :mod:`.kquant_low`: ``nearest_int``, sums in the C loop's order,
the first-maximum search, F16 rounding, and ``make_qkx2_quants`` (Q4_K, Q5_K, Q2_K). The notes on exactness are
in :mod:`.kquant_encode`.
"""

from __future__ import annotations

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
    buf, q, wl = (np.empty_like(x) for _ in range(3))  # few arrays: the working set stays in L2

    def diff_sum(scale: np.ndarray, low: np.ndarray, q: np.ndarray) -> np.ndarray:
        diff = np.multiply(scale, q, out=buf)
        np.add(diff, low, out=diff)
        np.subtract(diff, x, out=diff)
        if use_mad:
            np.abs(diff, out=diff)
        else:
            np.multiply(diff, diff, out=diff)
        return np.add.reduce(np.multiply(w, diff, out=diff), axis=0)  # only compared: −0 and +0 alike

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
        np.multiply(w, q, out=wl)
        # sum_l or sum_l2 is −0 only where every l is 0, and there D = ±0 is not > 0: no seq_sum's + 0
        sum_l = np.add.reduce(wl, axis=0)
        sum_xl = seq_sum(np.multiply(wl, x, out=buf))
        sum_l2 = np.add.reduce(np.multiply(wl, q, out=wl), axis=0)
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
    "f32",
    "first_abs_max",
    "keep_columns",
    "make_qkx2",
    "nearest_clip",
    "nearest_int",
    "seq_sum",
    "to_f16_f32",
]
