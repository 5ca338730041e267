"""MXFP4 (OCP microscaling): E2M1 codes with one E8M0 scale per 32 values, as gpt-oss stores its experts.

On disk (``quantization_config.quant_method: mxfp4``): ``<param>_blocks`` uint8 (E, rows, in/32, 16), two
E2M1 codes per byte, the even element in the low nibble; ``<param>_scales`` uint8 (E, rows, in/32), a
biased power-of-two exponent (value 2^(s − 127)). The logical tensor ``<param>`` is what transformers'
``convert_moe_packed_tensors`` makes of them: ``lut[code] · 2^(s − 127)``, reshaped to (E, rows, in) and
transposed to (E, in, rows) — gpt-oss' own (experts, in, out) layout. Everything else (attention, router,
embeddings, biases) is stored in 16-bit and passes through.

Dequantization is the same arithmetic as transformers' (the code's value in fp32, ``ldexp`` by the scale,
one cast): bit-equal to it. ``--requantize`` rounds the merged weight back with power-of-two scales rounded
*up* from max|block| / 6 (so no code clips) and round-to-nearest-even codes, the rule of triton_kernels'
``downcast_to_mxfp`` (``DequantScaleRoundingMode.ROUND_UP``), which transformers' MXFP4 quantizer calls.
That quantizer needs a GPU: this requantization is built from its source, untested against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loratools.checkpoint.quant import checks
from loratools.checkpoint.quant.scheme import QuantScheme
from loratools.errors import FormatError

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.quant.layout import QuantizedCheckpoint, QuantTensor

#: the 16 E2M1 values, code order (transformers' FP4_VALUES, the OCP table)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
#: between two neighbouring magnitudes; a value exactly on boundary i goes to the even code (i or i+1)
_BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def unpack_codes(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) -> codes (..., 2n): the low nibble first."""
    import torch

    b = blocks.to(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes (..., 2n) -> uint8 (..., n), the even element in the low nibble."""
    import torch

    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even E2M1 codes (int32) of finite fp32 ``x`` (magnitudes above 6 clip to 6; the sign
    kept): :func:`_codes` widened."""
    import torch

    return _codes(x.to(torch.float32).contiguous()).to(torch.int32)


def _codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes of contiguous finite fp32 ``x`` by two byte-table gathers on its bits, no search.

    Every boundary between the 8 magnitudes (0.25 … 5) has at most 2 mantissa bits, so the exponent and the
    top 2 mantissa bits of |x| (``bits >> 21``) say which two magnitudes it lies between, and only a value
    exactly on a boundary needs more. ``(bits − 1) >> 21`` puts such a value in the bucket below (its tie
    goes down: the even boundaries); a second table, non-zero only at the buckets that start at 0.75, 1.75
    and 3.5, lifts a value exactly there to the even code above (the max of the two). The sign is the fp32
    sign bit. The same codes as one ``bucketize`` over the boundaries (the odd ones one ulp down, so their
    ties go up: ``tests/moe/test_moe_requant_stream.py`` counts them per boundary), ~6× faster.
    """
    import torch

    down, up = _tables()
    bits = x.view(torch.int32)
    mag = bits & 0x7FFFFFFF
    low = down.index_select(0, (mag - 1).clamp_(min=0).view(-1) >> 21)
    low = torch.maximum(low, up.index_select(0, (mag >> 21).view(-1)), out=low)
    return low.view(x.shape) | ((bits >> 28) & 8).to(torch.uint8)


_TABLES: list[torch.Tensor] = []


def _tables() -> list[torch.Tensor]:
    """The two 1024-entry code tables of :func:`_codes` (by bucket ``|bits| >> 21``), built once by
    ``bucketize`` from a value inside each bucket and from each bucket's first value."""
    import torch

    if not _TABLES:
        edges = _edges()
        bucket = torch.arange(1024, dtype=torch.int32)
        inside = torch.where(bucket >= 1020, 7.0, ((bucket << 21) | 1).view(torch.float32))  # 1020+: no finite x
        first = (bucket << 21).view(torch.float32)
        odd = torch.isin(first, torch.tensor([0.75, 1.75, 3.5]))
        up = torch.where(odd, torch.bucketize(first, edges, out_int32=True), 0)
        _TABLES.extend((torch.bucketize(inside, edges, out_int32=True).to(torch.uint8), up.to(torch.uint8)))
    return _TABLES


def _edges() -> torch.Tensor:
    import torch

    b = torch.tensor(_BOUNDARIES, dtype=torch.float32)
    return torch.where(torch.arange(len(_BOUNDARIES)) % 2 == 1, torch.nextafter(b, torch.zeros_like(b)), b)


def dequantize_blocks(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(E, rows, G, 16) codes and (E, rows, G) exponents -> (E, G·32, rows) in ``dtype``, as transformers
    computes it (``lut`` value in fp32 times 2^(s − 127), rounded once)."""
    import torch

    lut = torch.tensor(E2M1, dtype=torch.float32)
    values = lut[unpack_codes(blocks).to(torch.int64)]  # (E, rows, G, 32)
    exp = scales.to(torch.int32).sub(127).unsqueeze(-1)
    w = torch.ldexp(values, exp).to(dtype)
    e, rows, g, _ = blocks.shape
    return w.reshape(e, rows, g * BLOCK).transpose(1, 2).contiguous()


#: rows of one expert :func:`dequantize_into` takes at a time (its fp32 temporaries: ~1 MiB per 1000 inputs)
CHUNK_ROWS = 128


def dequantize_into(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`dequantize_blocks` written into ``out`` (E, G·32, rows): the same values (each is its code's fp32
    value ``ldexp``-ed by its scale, rounded once into ``out``'s dtype), :data:`CHUNK_ROWS` rows of one expert
    at a time, so the temporaries are one expert in ``out``'s dtype plus O(chunk), not 5× the tensor in
    fp32/int64. A byte's two values come from a 256-entry table (one int32 gather, not two int64 ones):
    2-3× faster than :func:`dequantize_blocks` on one thread."""
    import torch

    lut = torch.tensor(E2M1, dtype=torch.float32)
    pairs = lut[unpack_codes(torch.arange(256, dtype=torch.uint8)).long()].view(256, 2)  # low nibble first
    # ldexp(v, k) is v * 2.0**k in fp32: the 256 powers gathered by scale byte, then one in-place multiply (~2x)
    pow2 = torch.ldexp(torch.ones(256), torch.arange(256, dtype=torch.int32) - 127)
    e, rows, g, _ = blocks.shape
    for i in range(e):
        for r0 in range(0, rows, CHUNK_ROWS):
            b, s = blocks[i, r0 : r0 + CHUNK_ROWS], scales[i, r0 : r0 + CHUNK_ROWS]
            n = b.shape[0]
            values = pairs.index_select(0, b.reshape(-1).to(torch.int32)).view(n, g, BLOCK)
            w = values.mul_(pow2.index_select(0, s.reshape(-1).to(torch.int32)).view(n, g, 1))
            out[i, :, r0 : r0 + n].copy_(w.view(n, g * BLOCK).T)  # the chunk's columns, while it is in cache
    return out


#: rows of one expert :func:`quantize_blocks` takes at a time (its temporaries stay in cache)
QUANT_ROWS = 64


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, in, rows) fp32 -> (blocks uint8 (E, rows, in/32, 16), scales uint8 (E, rows, in/32)).

    One expert transposed to its stored (rows, in) layout, then :data:`QUANT_ROWS` rows of it at a time (each
    block is one row's 32 inputs: the same bytes as the whole tensor at once, with cache-sized temporaries)."""
    import torch

    e, n_in, rows = w.shape
    g = n_in // BLOCK
    blocks = torch.empty((e, rows, g, BLOCK // 2), dtype=torch.uint8)
    scales = torch.empty((e, rows, g), dtype=torch.uint8)
    for i in range(e):
        stored = w[i].to(torch.float32).T.contiguous()  # (rows, in): one whole transpose is ~4x faster than by rows
        for r0 in range(0, rows, QUANT_ROWS):
            x = stored[r0 : r0 + QUANT_ROWS]
            n = x.shape[0]
            x = x.view(n, g, BLOCK)
            amax = x.abs().amax(-1)
            # the dequant scale max|block| / 6 rounded up to a power of two (its fp32 exponent field, rounded up)
            bits = (amax / 6.0).view(torch.int32)
            up = ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)
            biased = (up.view(torch.int32) >> 23).clamp(0, 254)  # E8M0: 255 is NaN
            scale = torch.ldexp(torch.ones_like(amax), biased - 127)
            blocks[i, r0 : r0 + n] = pack_codes(_codes(x / scale.unsqueeze(-1)))
            scales[i, r0 : r0 + n] = biased
    return blocks, scales


class Mxfp4(QuantScheme):
    names = ("mxfp4",)
    requantizable = ("mxfp4",)

    def detect(self, qcfg: dict[str, Any], config: dict[str, Any]) -> str | None:
        return "mxfp4" if str(qcfg.get("quant_method", "")).lower() == "mxfp4" else None

    def discover(self, cp: QuantizedCheckpoint, keys: set[str]) -> None:
        from loratools.checkpoint.quant.layout import QuantTensor

        for k in sorted(keys):
            if not k.endswith("_blocks"):
                continue
            stem = k.removesuffix("_blocks")
            if f"{stem}_scales" not in keys:
                raise FormatError(f"{cp._at(k)}: MXFP4 blocks without {stem}_scales beside them", hint=checks.DAMAGED)
            parts = {"weight": k, "scales": f"{stem}_scales"}
            p = cp._parts(parts)
            p.want("weight", ("U8",))
            b = p.info("weight")
            if len(b.shape) != 4 or b.shape[-1] != BLOCK // 2:
                p.refuse("weight", f"has shape {list(b.shape)}; MXFP4 expert blocks are (experts, rows, in/32, 16)")
            p.want("scales", ("U8",), shape=tuple(b.shape[:-1]))
            e, rows, g, _ = b.shape
            cp.tensors[stem] = QuantTensor(stem, "mxfp4", parts, (e, g * BLOCK, rows), cp.compute_dtype, {"bits": 4})

    def dequantize(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype, at: Callable[[str], str]
    ) -> torch.Tensor:
        import torch

        # transformers rounds once into the parameter's dtype: fp32 callers get that rounding too
        out = dtype if dtype != torch.float32 else _dtype(t)
        return dequantize_blocks(parts["weight"], parts["scales"], out).to(dtype)

    def value_range(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], at: Callable[[str], str]
    ) -> tuple[str, float, float]:
        s = parts["scales"]
        top = int(s.max()) if s.numel() else 0
        if top == 255:  # E8M0's NaN
            raise _nan_scale(t, s, at("scales"))
        return "scales", 2.0 ** (top - 127), 6.0

    def requantize(
        self, t: QuantTensor, merged: torch.Tensor, old: dict[str, torch.Tensor], where: str
    ) -> dict[str, torch.Tensor]:
        blocks, scales = quantize_blocks(merged)
        return {**old, "weight": blocks.reshape(old["weight"].shape), "scales": scales.reshape(old["scales"].shape)}


def _dtype(t: QuantTensor) -> torch.dtype:
    from loratools.files.safetensors_file import torch_dtype

    return torch_dtype(t.dtype)


def _nan_scale(t: QuantTensor, s: torch.Tensor, where: str) -> Exception:
    from loratools.errors import NumericError

    first = [int(i) for i in (s == 255).nonzero()[0].tolist()]
    return NumericError(
        f"{where} holds the E8M0 NaN scale 255 (first at index {first}); dequantizing {t.key} would write NaN",
        hint="the quantized checkpoint is damaged; nothing was written",
    )


SCHEME = Mxfp4()
