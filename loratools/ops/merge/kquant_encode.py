"""K-quant encoders (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K) that reproduce llama.cpp's reference quantizers byte for byte.

The ``gguf`` package decodes K-quants but cannot encode them, so a merged Q4_K tensor used to be written as F16.
These are ggml's ``quantize_row_q*_K_ref`` (``ggml/src/ggml-quants.c``: ``make_qkx2_quants`` for Q4_K/Q5_K/Q2_K,
``make_qx_quants`` for Q6_K, ``make_q3_quants`` for Q3_K; no importance matrix), vectorised across blocks in
numpy float32. C float arithmetic is evaluated one operation at a time in source order, so every product and
quotient here is one numpy float32 operation in that order, and every sum over a block's elements runs in the C
loop's order: elements are laid out ``(element, block)`` and summed with ``np.add.reduce(axis=0)``, which adds
row after row (sequential per column, unlike a sum along the contiguous axis or ``torch.sum``), or with one
``np.einsum`` per sum of products where that is C's arithmetic too (``kquant_math.einsum_is_c``, checked once).
``nearest_int`` is ggml's own bit trick (``(f + 1.5·2²³)`` as int32, low 23 bits − 2²²), so even its values beyond
±2²² match (``rint`` where |f| < 2²², the same).
``tests/gguf/test_kquant_encode.py`` compares the bytes with libggml's own functions (through the llama.cpp
runtime venv) on random rows with outliers, zeros, constant and tiny blocks.

Input: float32 values, finite and within ±65504 (F16's range, checked by the caller), a multiple of 256 of them.
Measured equal on 3·4000 blocks per type with block maxima from 1e-30 to 65504 (normal, t(1.2), uniform) and
the edge blocks of the test; beyond ~1e5 the super-block scales overflow F16 and ggml's own results turn to
inf/NaN scales that no decoder reads back (a byte difference there would mean nothing, so such values are refused).
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

#: bytes per 256-value super-block
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
#: super-blocks per chunk: temporaries of (32, 8·chunk) float32 stay in cache
_CHUNK = 256
#: chunk multipliers: Q3_K's refinement rounds cost per chunk more than per value (4 × 256: ~17 % faster)
_CHUNK_TIMES = {"Q3_K": 4}
#: the largest |value| encoded (F16's largest finite)
MAX_ABS = 65504.0


def encodable(type_name: str) -> bool:
    return type_name in BLOCK_BYTES


def quantize(values: np.ndarray, type_name: str, threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """``values`` (float32, any shape, size a multiple of 256) as ``type_name``: a flat uint8 array (``out`` if
    given), identical to ggml's ``quantize_row_<type>_ref`` over the same values. Chunks of super-blocks are
    independent: with ``threads`` > 1 they run on that many threads (numpy releases the GIL in its loops)."""
    import numpy as np

    from loratools.ops.merge import kquant_low

    fn = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "Q3_K": kquant_low.q3_k, "Q2_K": kquant_low.q2_k}[type_name]
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, QK_K)
    size = flat.shape[0] * BLOCK_BYTES[type_name]
    out = np.empty(size, dtype=np.uint8) if out is None else out.reshape(-1)[:size]
    blocks = out.reshape(flat.shape[0], BLOCK_BYTES[type_name])

    chunk = _CHUNK * _CHUNK_TIMES.get(type_name, 1)

    def run(s: int) -> None:
        with np.errstate(all="ignore"):  # x/0 and 1/0 where C computes them too; those lanes are masked out
            fn(flat[s : s + chunk], blocks[s : s + chunk])

    starts = range(0, flat.shape[0], chunk)
    if threads > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(starts)), thread_name_prefix="loratools-kquant") as pool:
            list(pool.map(run, starts))
    else:
        for s in starts:
            run(s)
    return out


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 scale bytes from 6-bit scales and mins (nb, 8)."""
    import numpy as np

    sc = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return sc


# ---- Q4_K / Q5_K ---------------------------------------------------------------------------------------------------


def _qk_scales(x: np.ndarray, out: np.ndarray, nmax: int, rmin: float, nstep: int) -> np.ndarray:
    """The common part of Q4_K and Q5_K: sub-blocks of 32 through make_qkx2, d/dmin and 6-bit scales written to
    ``out[:, 0:16]``; the final L (nb, 256) as int."""
    import numpy as np

    nb = x.shape[0]
    X = columns(x, 32)
    av_x = np.sqrt(dot_sum(X, X) / f32(32.0))
    W = av_x + np.abs(X)
    scales, mins, L = make_qkx2(X, W, nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0.0))
    max_min = np.maximum(mins.max(axis=1), f32(0.0))
    inv_scale = np.where(max_scale > 0, f32(63.0) / max_scale, f32(0.0))[:, None]
    inv_min = np.where(max_min > 0, f32(63.0) / max_min, f32(0.0))[:, None]
    ls = np.minimum(nearest_int(inv_scale * scales) & 0xFF, 63).astype(np.uint8)  # uint8_t, then MIN(63, ·)
    lm = np.minimum(nearest_int(inv_min * mins) & 0xFF, 63).astype(np.uint8)
    d16, d = to_f16_f32(max_scale / f32(63.0))
    m16, dmin = to_f16_f32(max_min / f32(63.0))
    out[:, 0:2] = d16[:, None].view(np.uint8)
    out[:, 2:4] = m16[:, None].view(np.uint8)
    out[:, 4:16] = pack_scale_min_k4(ls, lm)
    dj = (d[:, None] * ls.astype(np.float32)).reshape(-1)
    dm = (dmin[:, None] * lm.astype(np.float32)).reshape(-1)
    q = nearest_clip(np.divide(np.add(X, dm, out=X), dj, out=X), 0, nmax)  # d == 0 lanes: inf/NaN, not taken
    L = keep_columns(q, L, dj == 0)  # d == 0: the sub-block keeps make_qkx2's L
    return L.astype(np.uint8).T.reshape(nb, QK_K)


def _q4_k(x: np.ndarray, out: np.ndarray) -> None:
    L = _qk_scales(x, out, 15, -1.0, 20).reshape(-1, 4, 2, 32)
    out[:, 16:144] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _q5_k(x: np.ndarray, out: np.ndarray) -> None:
    import numpy as np

    L = _qk_scales(x, out, 31, -0.5, 15).reshape(-1, 4, 2, 32)  # (nb, group of 64, half, 32)
    hi = (L >> 4).astype(np.uint8)
    shifts = (np.arange(4, dtype=np.uint8) * 2)[None, :, None]
    qh = np.bitwise_or.reduce((hi[:, :, 0] << shifts) | (hi[:, :, 1] << (shifts + 1)), axis=1)
    out[:, 16:48] = qh
    lo = L & 0xF
    out[:, 48:176] = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)


# ---- Q6_K ----------------------------------------------------------------------------------------------------------


def make_qx_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` per column: (scale, L) with L = l + nmax, float32.
    Each candidate's iscale depends on max alone, so the sums of all 20 candidates are made first and the C
    loop's sequential choice then runs over those (N,)-vectors only; L is made again from the chosen iscale."""
    import numpy as np

    amax, mx = first_abs_max(x)
    zero = amax < f32(EPS)
    w = x * x
    wx = w * x
    q = np.empty_like(x)
    # the first candidate is −nmax/max, then −(nmax + 0.1·is)/max for is = −9..9 but 0, in C's order
    num = [f32(-nmax)] + [-(f32(nmax) + f32(0.1) * f32(i)) for i in range(-9, 10) if i != 0]
    iscales = np.array(num, dtype=np.float32)[:, None] / mx
    sumlx = np.empty_like(iscales)
    suml2 = np.empty_like(iscales)
    for k in range(len(num)):
        nearest_clip(np.multiply(iscales[k], x, out=q), -nmax, nmax - 1)  # |max| ≥ 1e-15 where it counts: finite
        sumlx[k] = dot_sum(wx, q)  # sumlx += w*x[i]*l (wx = w*x)
        suml2[k] = dot_sum(w, q, q)  # suml2 += w*l*l
    ratio = sumlx / suml2
    cand = ratio * sumlx  # best = scale*sumlx of a candidate taken
    square = sumlx * sumlx
    scale0 = np.where(suml2[0] != 0, ratio[0], f32(0.0))
    best = scale0 * sumlx[0]
    chosen = np.zeros(x.shape[1], dtype=np.intp)
    for k in range(1, len(num)):
        # C's suml2 > 0 is implied: where suml2 = 0 every w·l is 0, so sumlx = ±0 and 0 > best·0 fails
        take = square[k] > best * suml2[k]
        np.copyto(best, cand[k], where=take)
        chosen[take] = k
    cols = np.arange(x.shape[1])
    scale = np.where(chosen == 0, scale0, ratio[chosen, cols])
    # all zero: C stores L = 0, i.e. l = −nmax: an iscale of 0 makes l = 0, times 0 after the + nmax
    nearest_clip(np.multiply(np.where(zero, f32(0.0), iscales[chosen, cols]), x, out=q), -nmax, nmax - 1)
    L = np.multiply(np.add(q, f32(nmax), out=q), (~zero).astype(np.float32), out=q)
    return np.where(zero, f32(0.0), scale), L


def _q6_k(x: np.ndarray, out: np.ndarray) -> None:
    import numpy as np

    nb = x.shape[0]
    X = columns(x, 16)
    scales, L = make_qx_rmse1(X, 32)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = first_abs_max(scales.T)
    zero = max_abs < f32(EPS)
    iscale = f32(-128.0) / max_scale
    d16, d = to_f16_f32(f32(1.0) / iscale)
    sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    dj = (d[:, None] * sc.astype(np.float32)).reshape(-1)
    q = np.add(nearest_clip(np.divide(X, dj, out=X), -32, 31), f32(32.0), out=X)
    L = keep_columns(q, L, dj == 0).astype(np.uint8).T.reshape(nb, 2, 4, 32)  # (nb, half of 128, quarter, 32)
    lo, hi = L & 0xF, L >> 4
    ql = np.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16[:, None].view(np.uint8)
    out[zero] = 0  # memset, d = +0


__all__ = ["BLOCK_BYTES", "MAX_ABS", "QK_K", "encodable", "quantize"]
