"""The GGUF merge's fast per-tensor codec (ops/merge/gguf_tensors.py) writes the bytes the ``gguf`` package
writes and reads the values it reads, on the values where rounding decides: every F16/BF16 rounding
boundary, Q8_0 ties, zero blocks, scales whose reciprocal overflows, and real fixture tensors."""

from __future__ import annotations

from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf_support import GGUF

from loratools.files.gguf_file import GgufFile
from loratools.ops.merge.gguf_tensors import NotFinite, Scratch, all_finite, decode, encode

Q8 = gguf.GGMLQuantizationType.Q8_0


def _boundaries(kind: str) -> np.ndarray:
    """For every finite 16-bit value: itself, the midpoint to the next one, and the floats either side
    of that midpoint (where round-to-nearest-even decides), plus values that overflow."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    if kind == "F16":
        vals = bits.view(np.float16).astype(np.float32)
    else:
        vals = (bits.astype(np.uint32) << 16).view(np.float32)
    vals = np.sort(vals[np.isfinite(vals)])
    mid = ((vals[:-1].astype(np.float64) + vals[1:]) / 2).astype(np.float32)
    near = [np.nextafter(mid, np.float32(-np.inf)), mid, np.nextafter(mid, np.float32(np.inf))]
    big = np.float32(65504.0 if kind == "F16" else np.finfo(np.float32).max)
    return np.concatenate([vals, *near, [big, -big, 65519.996, 65520.0, 1e-45, -1e-45]]).astype(np.float32)


def _encoded(x: np.ndarray, kind: str) -> np.ndarray:
    return encode(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), kind, Scratch()).copy()


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_half_types_round_like_the_package(kind):
    x = _boundaries(kind)
    x = x[: x.size // 32 * 32]
    want = x.astype(np.float16) if kind == "F16" else gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16)
    want = want.reshape(-1).view(np.float16 if kind == "F16" else np.uint16)
    as_float = want.astype(np.float32) if kind == "F16" else (want.astype(np.uint32) << 16).view(np.float32)
    fits = np.isfinite(as_float).reshape(-1, 32).all(axis=1).repeat(32)  # blocks whose values fit the type
    x, want = x[fits], want[fits]
    assert np.array_equal(_encoded(x, kind), want.view(np.uint8))
    if not fits.all():  # a value finite in fp32 but beyond the type's range is refused, not written as Inf
        with pytest.raises(NotFinite):
            _encoded(np.full(32, np.finfo(np.float32).max, dtype=np.float32), kind)


def _q8_cases() -> np.ndarray:
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((3000, 32)) * s for s in (1e-3, 0.02, 1.0, 300.0)]
    ties = np.tile(np.arange(-16, 16, dtype=np.float32) + 0.5, (8, 1))  # x·id lands on k + ½
    ties[:, 0] = 127.0  # d = 1, id = 1
    below_half = np.full((4, 32), np.nextafter(np.float32(0.5), np.float32(0)), dtype=np.float32)
    below_half[:, 0] = 127.0
    zeros = np.zeros((5, 32))
    tiny = rng.standard_normal((7, 32)) * 1e-39  # d < 2⁻¹²⁸: 1/d overflows (the package's own arithmetic)
    signed_zero = np.full((2, 32), -0.0)
    return np.concatenate([*blocks, ties, below_half, zeros, tiny, signed_zero]).astype(np.float32)


@pytest.mark.parametrize("threads", [1, 2])  # the chunk size follows torch's thread count
def test_q8_0_encodes_like_the_package(threads):
    x = _q8_cases()
    rng = np.random.default_rng(1)
    x = x[rng.permutation(len(x))]  # overflowing scales mixed into chunks of ordinary blocks
    with np.errstate(over="ignore", invalid="ignore"):  # the package's 1/d overflows on the tiny blocks
        want = gguf.quants.quantize(x, Q8).reshape(-1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert np.array_equal(_encoded(x, "Q8_0"), want)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_refuses_nan_and_inf(kind, bad):
    x = torch.zeros(4096)
    x[3001] = bad
    with pytest.raises(NotFinite):
        encode(x, kind, Scratch())


def _tensor(kind: str, shape: tuple[int, ...]) -> SimpleNamespace:
    qtype = gguf.GGMLQuantizationType[kind]
    return SimpleNamespace(type_label=kind, tensor_type=qtype, shape=shape, n_elements=int(np.prod(shape)))


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1"])
def test_decode_and_encode_round_trip_like_the_package(kind):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((96, 64)) * 0.05).astype(np.float32)
    stored = x.astype(np.float16) if kind == "F16" else gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind])
    raw = np.ascontiguousarray(stored).reshape(-1).view(np.uint8)
    t = _tensor(kind, x.shape)
    got = decode(torch.from_numpy(raw.copy()), t, Scratch())
    byte_shape = gguf.quants.quant_shape_to_byte_shape(x.shape, t.tensor_type)
    want = gguf.quants.dequantize(raw.reshape(byte_shape).view(stored.dtype), t.tensor_type)
    assert np.array_equal(got.numpy(), want.reshape(x.shape))
    again = encode(got, kind, Scratch())
    assert np.array_equal(again, gguf.quants.quantize(want.reshape(x.shape), t.tensor_type).reshape(-1).view("u1"))


@pytest.mark.parametrize("fixture", ["kquant.gguf", "llama-q8_0.gguf"])
def test_decode_fixture_tensors_like_the_package(fixture):
    f = GgufFile(GGUF / fixture)
    scratch = Scratch()  # reused across tensors of different types and sizes, as the merge does
    for t in f.tensors:
        stored = torch.from_numpy(np.array(t.data).reshape(-1).view(np.uint8))
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(t.shape)
        assert np.array_equal(decode(stored, t, scratch).numpy(), want), t.name


def test_all_finite_is_exact():
    x = torch.full((1000,), 3e38)  # finite, but the sum overflows
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = torch.zeros(100)
        y[37] = bad
        assert not all_finite(y)
    y = torch.tensor([float("inf"), float("-inf")])  # their sum is NaN
    assert not all_finite(y)
