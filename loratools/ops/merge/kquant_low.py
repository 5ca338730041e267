"""Q3_K and Q2_K encoders: ggml's ``quantize_row_q3_K_ref`` / ``quantize_row_q2_K_ref`` byte for byte, vectorised
across blocks in numpy float32 the way :mod:`.kquant_encode` is (read its notes: one float op per C op, sums in the
C loop's order). ``make_q3_quants``' refinement walks a sub-block's 16 elements one at a time, updating its sums as
it goes: here each pass tests all elements of all sub-blocks at once against the pass's starting sums, takes each
sub-block's first change, and goes on from there with the sub-blocks that changed (:func:`make_q3`); a sub-block
whose pass changed nothing stops (C's ``break``) while the others go on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratools.ops.merge.kquant_math import (
    EPS,
    QK_K,
    columns,
    dot_sum,
    f32,
    first_abs_max,
    keep_columns,
    make_qkx2,
    nearest_clip,
    nearest_int,
    to_f16_f32,
)

if TYPE_CHECKING:
    import numpy as np


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs[64] from L (nb, 256) of 2-bit values: byte 32·h + l holds L[128h + l + 32k] at bits 2k."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


# ---- Q2_K ----------------------------------------------------------------------------------------------------------


def q2_k(x: np.ndarray, out: np.ndarray) -> None:
    import numpy as np

    nb = x.shape[0]
    X = columns(x, 16)
    scales, mins, L = make_qkx2(X, np.abs(X), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=1), f32(0.0))
    max_min = np.maximum(mins.max(axis=1), f32(0.0))
    has_scale, has_min = max_scale > 0, max_min > 0
    ls = nearest_int((f32(15.0) / max_scale)[:, None] * scales) & 0xFF  # y[i].scales[j] = l (uint8_t)
    ls = np.where(has_scale[:, None], ls, 0)
    lm = (nearest_int((f32(15.0) / max_min)[:, None] * mins) << 4) & 0xFF
    sc = (ls | np.where(has_min[:, None], lm, 0)).astype(np.uint8)
    d16, d = to_f16_f32(np.where(has_scale, max_scale / f32(15.0), f32(0.0)))
    m16, dmin = to_f16_f32(np.where(has_min, max_min / f32(15.0), f32(0.0)))
    dj = (d[:, None] * (sc & 0xF).astype(np.float32)).reshape(-1)
    dm = (dmin[:, None] * (sc >> 4).astype(np.float32)).reshape(-1)
    q = nearest_clip(np.divide(np.add(X, dm, out=X), dj, out=X), 0, 3)  # d == 0 lanes: inf/NaN, not taken
    L = keep_columns(q, L, dj == 0).astype(np.uint8).T.reshape(nb, QK_K)
    out[:, 0:16] = sc
    out[:, 16:80] = _pack_2bit(L)
    out[:, 80:82] = d16[:, None].view(np.uint8)
    out[:, 82:84] = m16[:, None].view(np.uint8)


# ---- Q3_K ----------------------------------------------------------------------------------------------------------


def make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` per column of ``x`` (element, sub-block): (scale, L + nmax).

    C walks a sub-block's elements in order and takes a change as soon as it helps, updating its sums. Until
    a column's first change its sums are the ones it started the pass with, so every element of every column
    is tested at once against those; a column's first passing element is its first change (those before it
    fail with the same sums, as in C). The columns that changed go on from the element after, against their
    new sums, and so on until no column changes in the pass; a column with no change in a pass is done (C's
    ``break``). Later rounds and passes run on the columns still going only (about 1 in 5 changes a pass)."""
    import numpy as np

    amax, mx = first_abs_max(x)
    zero = amax < f32(EPS)
    lo, hi = -nmax, nmax - 1
    L = nearest_clip(np.multiply(f32(-nmax) / mx, x), lo, hi)  # only zero columns can exceed 2²²: not used
    w = x * x
    wx = w * x
    sumlx, suml2 = dot_sum(wx, L), dot_sum(w, L, L)
    n = x.shape[0]
    rows = np.arange(n)[:, None]
    live = np.flatnonzero(~zero)  # columns still in a pass
    for _ in range(5):
        if not live.size:
            break
        changed = np.zeros(live.size, dtype=bool)
        cols, start = live, None  # columns in this round, first element each tests (None: all from 0)
        while cols.size:
            if cols.size == x.shape[1]:
                xs, ws, wxs, ls = x, w, wx, L  # all columns: no copies
            else:
                xs, ws, wxs, ls = (np.take(a, cols, axis=1) for a in (x, w, wx, L))
            sx, s2 = sumlx[cols], suml2[cols]
            slx = sx - wxs * ls
            sl2 = s2 - ws * ls * ls
            f = xs * sl2 / slx
            new_l = np.clip(np.rint(f), lo, hi)  # nearest_int where |f| < 2²², its bit trick elsewhere:
            big = ~(np.abs(f) < f32(4194304.0))
            if big.any():
                new_l[big] = np.clip(nearest_int(f[big]), lo, hi)
            pre = (slx > 0) & (new_l != ls)
            if start is not None:
                pre &= rows >= start
            r, k = np.nonzero(pre)  # few (about 2 in 100): the rest of C's test on those alone
            nl = new_l[r, k]
            slx2 = slx[r, k] + wxs[r, k] * nl
            sl22 = sl2[r, k] + ws[r, k] * nl * nl
            sxk = sx[k]
            ok = (sl22 > 0) & (slx2 * slx2 * s2[k] > sxk * sxk * sl22)
            r, k, nl, slx2, sl22 = r[ok], k[ok], nl[ok], slx2[ok], sl22[ok]
            if not k.size:
                break
            first = np.full(cols.size, n, dtype=np.intp)
            first[k[::-1]] = r[::-1]  # row-major order: written last, the smallest row of each column stays
            pick = np.flatnonzero(first[k] == r)  # each column's first passing element
            c = cols[k[pick]]
            L[r[pick], c] = nl[pick]
            sumlx[c] = slx2[pick]
            suml2[c] = sl22[pick]
            changed[np.searchsorted(live, c)] = True
            go = r[pick] + 1 < n
            cols, start = c[go], r[pick][go] + 1
        live = live[changed]  # a column whose pass changed nothing is done
    scale = np.where(suml2 > 0, sumlx / suml2, f32(0.0))
    L = np.where(zero, f32(0.0), L + f32(nmax))
    return np.where(zero, f32(0.0), scale), L


def q3_k(x: np.ndarray, out: np.ndarray) -> None:
    import numpy as np

    nb = x.shape[0]
    X = columns(x, 16)
    scales, L = make_q3(X, 4)
    scales = scales.reshape(nb, 16)
    amax, max_scale = first_abs_max(scales.T)
    has = max_scale != 0
    iscale = f32(-32.0) / max_scale
    l8 = nearest_int(iscale[:, None] * scales).astype(np.int8)  # int8_t l = nearest_int(...)
    lq = (np.clip(l8, -32, 31) + 32).astype(np.uint8)
    lq = np.where(has[:, None], lq, np.uint8(32))  # no scale: all bytes 0, i.e. sc = −32 (d = 0 anyway)
    sc = np.zeros((nb, 12), dtype=np.uint8)
    sc[:, 0:8] = (lq[:, 0:8] & 0xF) | ((lq[:, 8:16] & 0xF) << 4)
    hi = (lq >> 4).reshape(nb, 4, 4)  # [j / 4, j % 4]
    sc[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    sc = np.where(has[:, None], sc, np.uint8(0))
    d16, d = to_f16_f32(np.where(has, f32(1.0) / iscale, f32(0.0)))
    dj = (d[:, None] * (lq.astype(np.float32) - f32(32.0))).reshape(-1)
    q = np.add(nearest_clip(np.divide(X, dj, out=X), -4, 3), f32(4.0), out=X)  # d == 0 lanes: inf/NaN, not taken
    L = keep_columns(q, L, dj == 0).astype(np.uint8).T.reshape(nb, QK_K)
    high = L > 3
    out[:, 0:32] = np.bitwise_or.reduce(
        high.reshape(nb, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1
    )  # hmask: bit j // 32 of byte j % 32
    out[:, 32:96] = _pack_2bit(L & 3)  # L − 4 where L > 3
    out[:, 96:108] = sc
    out[:, 108:110] = d16[:, None].view(np.uint8)


__all__ = ["make_q3", "q2_k", "q3_k"]
