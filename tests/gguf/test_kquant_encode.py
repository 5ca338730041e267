"""The K-quant encoders (loratools.ops.merge.kquant_encode) against llama.cpp's own: the bytes of libggml's
``quantize_row_q*_K_ref`` (the quantizer ``llama_model_quantize`` runs without an importance matrix), called with
ctypes from the llama.cpp runtime venv's libggml-base (b11739, see tests/llamacpp/llamacpp_support.py; skipped
where that venv is missing). Rows hold normal, heavy-tailed, integer, all-zero, constant, all-positive/negative,
tiny (1e-12, 1e-30, 1e-38, subnormal) and ±65504 blocks, zero sub-blocks and outliers. Without the library the
layout is still checked: the gguf package decodes our bytes to within the type's step of the input.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from loratools.ops.merge.gguf_tensors import NotFinite, Scratch, can_encode, encode
from loratools.ops.merge.kquant_encode import BLOCK_BYTES, quantize

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
VENV = Path(os.environ.get("LORATOOLS_LLAMA_VENV", Path(__file__).resolve().parents[2] / ".venv-llama"))


def _libggml():
    found = sorted(VENV.glob("lib/python*/site-packages/llama_cpp_py_sync/libggml-base.so*"))
    if not found:
        pytest.skip(f"no libggml-base in {VENV} (make it: ../shared/tools/llama_cpp_runtime/setup.sh {VENV})")
    try:
        return ctypes.CDLL(str(found[0]))
    except OSError as e:
        pytest.skip(f"libggml-base does not load here: {e}")


def _ggml_bytes(lib, x: np.ndarray, kind: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.zeros(x.size // 256 * BLOCK_BYTES[kind], dtype=np.uint8)
    fn = getattr(lib, f"quantize_row_{kind[:2].lower()}_K_ref")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def _rows(seed: int, n_blocks: int = 768) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b = (rng.standard_normal((n_blocks, 256)) * 0.02).astype(np.float32)
    b[0::17] *= 100
    b[1::19] = 0
    b[2::23] = 0.5
    b[3::29] *= np.float32(1e-12)
    b[4::31, :16] = 0
    b[5::37, ::7] *= 300
    b[6::41] = np.abs(b[6::41])
    b[7::43] = -np.abs(b[7::43])
    b[8::47] = -2.0
    b[9::53] *= np.float32(1e-30)
    b[11::61] *= np.float32(1e-38)
    b[12::67] = np.float32(3e-42) * rng.integers(-5, 6, (len(b[12::67]), 256))
    b[10::59] = rng.integers(-3, 4, (len(b[10::59]), 256))
    b[13::71] = rng.standard_t(1.2, (len(b[13::71]), 256))
    b[14::73] = b[14::73] / np.abs(b[14::73]).max(axis=1, keepdims=True) * np.float32(65504)
    return b.reshape(-1)


@pytest.mark.parametrize("kind", TYPES)
def test_bytes_equal_llama_cpp_reference(kind):
    lib = _libggml()
    for seed in range(2):
        x = _rows(seed)
        want = _ggml_bytes(lib, x, kind).reshape(-1, BLOCK_BYTES[kind])
        got = quantize(x, kind).reshape(-1, BLOCK_BYTES[kind])
        bad = np.nonzero((want != got).any(axis=1))[0]
        assert bad.size == 0, (kind, seed, bad[:10].tolist())


def _edge_rows() -> np.ndarray:
    """Blocks for the paths the vectorised encoders take apart from C's loop: a sub-block's largest |value| as
    both +a and −a (C keeps the first), sub-blocks that are each other's negation (equal |scale| of opposite
    sign: the super-block scale's tie), −0.0 (alone, among values, in an all-positive block), and values whose
    scaled form lands on .5 (nearest_int rounds half to even)."""
    rng = np.random.default_rng(7)
    b = (rng.standard_normal((40, 256)) * 0.02).astype(np.float32)
    for i, sign in ((0, 1), (1, -1)):
        b[i, 3], b[i, 9] = sign * 0.5, -sign * 0.5  # ±a tie in the first 16 and the first 32
        b[i, 16 + 5], b[i, 16 + 2] = sign * 0.25, -sign * 0.25
        b[i + 2, 16:32] = -b[i + 2, 0:16]  # negated sub-blocks: opposite scales of one size
        b[i + 2, 0:16] *= 40 * sign
        b[i + 2, 16:32] *= 40 * sign
        b[i + 4, 32:64] = -b[i + 4, 0:32] * 3
    b[6] = -0.0
    b[7, ::3] = -0.0
    b[8] = np.abs(b[8])
    b[8, ::5] = -0.0
    b[9, :16] = -0.0
    b[10] = rng.integers(-64, 65, 256)  # Q6_K/Q3_K: iscale·x on halves
    b[10, 0] = 64
    b[11] = rng.integers(0, 31, 256)  # Q4_K: 15/30 · (x − 0) on halves
    b[11, 0], b[11, 1] = 0, 30
    b[12] = rng.integers(0, 7, 256) * np.float32(0.5)
    b[13] = np.repeat(rng.integers(-8, 9, 16).astype(np.float32), 16)  # constant sub-blocks
    b[14, ::2] = 0
    b[15:20] = rng.standard_t(1.5, (5, 256)) * 0.01
    return b.reshape(-1)


@pytest.mark.parametrize("kind", TYPES)
def test_bytes_equal_llama_cpp_reference_edges(kind):
    lib = _libggml()
    x = _edge_rows()
    want = _ggml_bytes(lib, x, kind).reshape(-1, BLOCK_BYTES[kind])
    got = quantize(x, kind).reshape(-1, BLOCK_BYTES[kind])
    bad = np.nonzero((want != got).any(axis=1))[0]
    assert bad.size == 0, (kind, bad.tolist())


@pytest.mark.parametrize("kind", TYPES)
def test_threads_and_chunks_do_not_change_bytes(kind, monkeypatch):
    from loratools.ops.merge import kquant_encode

    x = _rows(5, n_blocks=300)
    one = quantize(x, kind)
    monkeypatch.setattr(kquant_encode, "_CHUNK", 7)
    assert np.array_equal(quantize(x, kind, threads=3), one)


@pytest.mark.parametrize("kind", TYPES)
def test_sums_without_einsum_same_bytes(kind, monkeypatch):
    """Where numpy's einsum is not C's arithmetic (a fused multiply-add build), the sums fall back to products
    and sequential reductions: the same bytes."""
    from loratools.ops.merge import kquant_math

    x = np.concatenate([_rows(6, n_blocks=200), _edge_rows()])
    one = quantize(x, kind)
    monkeypatch.setattr(kquant_math, "einsum_is_c", lambda: False)
    assert np.array_equal(quantize(x, kind), one)


@pytest.mark.parametrize("kind", TYPES)
def test_gguf_package_decodes_it(kind):
    """The layout: a (rows, 512) tensor through gguf_tensors.encode, read back by the gguf package."""
    rng = np.random.default_rng(1)
    w = torch.from_numpy((rng.standard_normal((6, 512)) * 0.05).astype(np.float32))
    assert can_encode(kind)
    raw = encode(w.clone(), kind, Scratch()).copy()
    back = gguf.quants.dequantize(raw.reshape(6, -1), gguf.GGMLQuantizationType[kind])
    assert back.shape == (6, 512)
    bits = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}[kind]
    rel = float(np.sqrt(((back - w.numpy()) ** 2).mean()) / w.numpy().std())
    assert rel < 1.3 * 2.0 ** (1 - bits), rel  # about one step of 2^bits levels over the value range


def test_encode_refuses_what_f16_scales_cannot_hold():
    w = torch.zeros(256)
    w[3] = 70000.0
    with pytest.raises(NotFinite):
        encode(w, "Q4_K", Scratch())
    w[3] = float("nan")
    with pytest.raises(NotFinite):
        encode(w, "Q6_K", Scratch())
    assert not can_encode("IQ4_XS") and not can_encode("TQ1_0")
