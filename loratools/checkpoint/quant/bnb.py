"""bitsandbytes 4-bit (nf4/fp4, optionally double-quantized) and 8-bit (LLM.int8) weights, in plain torch.

The arithmetic follows bitsandbytes' own CPU path (``backends/default/ops.py``, ``functional.py``:
``QuantState.from_dict``, ``dequantize_4bit``, ``quantize_4bit``, ``quantize_blockwise``,
``int8_vectorwise_dequant``) operation for operation, so results are bit-equal to it (tests/quant):

- 4-bit: two codes per byte, high nibble first; value = ``quant_map[code] * absmax[block]`` in fp32,
  cast once to the state's dtype. Double quantization stores ``absmax`` as uint8 codes of the dynamic
  map ``nested_quant_map`` with one fp32 ``nested_absmax`` per ``nested_blocksize`` (256) blocks, plus
  ``nested_offset``: absmax = nested_quant_map[q] * nested_absmax[block] + offset.
- 8-bit: W = (q * SCB[row]) * (1/127) in fp32 (bitsandbytes multiplies by the reciprocal).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError

if TYPE_CHECKING:
    import torch

#: bitsandbytes' int8_vectorwise_dequant multiplies by this constant, not by 1/127 computed in fp32
INV_127 = 7.874015718698502e-3
STATE_PREFIX = "quant_state.bitsandbytes__"
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class State4bit:
    """The non-tensor part of a 4-bit quant state (the JSON stored as a uint8 tensor)."""

    quant_type: str
    blocksize: int
    dtype: str
    shape: tuple[int, ...]
    nested_blocksize: int | None = None
    nested_dtype: str | None = None
    nested_offset: float | None = None
    raw: dict[str, Any] | None = None

    @property
    def nested(self) -> bool:
        return self.nested_offset is not None


#: a quant state's JSON is ~170 bytes; anything far larger is not one (and is not decoded)
MAX_STATE_BYTES = 1 << 16
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def parse_state(data: torch.Tensor, where: str) -> State4bit:
    """The ``quant_state.bitsandbytes__nf4|fp4`` tensor: UTF-8 JSON bytes (bitsandbytes' pack_dict_to_tensor).

    Every field is checked (``where`` names the file and the state tensor): a damaged state is refused
    here, before any of its numbers sizes or indexes anything.
    """
    import torch

    if data.numel() * data.element_size() > MAX_STATE_BYTES:
        raise FormatError(f"{where}: a {data.numel()}-byte quant state is not a bitsandbytes quant state")
    try:
        doc = json.loads(bytes(data.reshape(-1).view(torch.uint8).numpy()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise FormatError(f"{where}: not a readable bitsandbytes quant state (JSON: {why})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: not a readable bitsandbytes quant state (a JSON {type(doc).__name__})")

    def field(name: str, ok: Any, want: str) -> Any:
        value = doc.get(name)
        if name not in doc or not ok(value):
            what = "missing" if name not in doc else f"{json.dumps(value, allow_nan=True)[:60]}"
            raise FormatError(f"{where}: quant state field {name} is {what}; bitsandbytes writes {want}")
        return value

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    sizes = ", ".join(map(str, BLOCKSIZES_4BIT))
    shape = field("shape", lambda v: isinstance(v, list) and 0 < len(v) <= 8 and all(is_int(s) and s > 0 for s in v),
                  "the weight's shape (positive integers)")  # fmt: skip
    state = State4bit(
        quant_type=field("quant_type", lambda v: v in ("nf4", "fp4"), '"nf4" or "fp4"'),
        blocksize=field("blocksize", lambda v: is_int(v) and v in BLOCKSIZES_4BIT, f"one of {sizes}"),
        dtype=field("dtype", lambda v: v in _FLOAT_DTYPES, "float32, float16 or bfloat16"),
        shape=tuple(shape),
        raw=doc,
    )
    if "nested_offset" in doc:
        finite = lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        state.nested_offset = float(field("nested_offset", finite, "a finite number"))
        block = field("nested_blocksize", lambda v: is_int(v) and v in BLOCKSIZES_4BIT, f"one of {sizes}")
        state.nested_blocksize = block
        if "nested_dtype" in doc:
            state.nested_dtype = field("nested_dtype", lambda v: v in _FLOAT_DTYPES, "float32")
        else:
            state.nested_dtype = "float32"
    return state


def pack_state(state: State4bit, nested_offset: float | None) -> torch.Tensor:
    """The JSON state tensor again, with a new nested offset (same keys in the same order as bitsandbytes)."""
    import torch

    doc = dict(state.raw or {})
    if nested_offset is not None:
        doc["nested_offset"] = nested_offset
    return torch.tensor(list(json.dumps(doc).encode("utf-8")), dtype=torch.uint8)


def _blockwise(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values * absmax[i // blocksize]`` in fp32, the last block possibly short (bitsandbytes' layout)."""
    import torch

    n = values.numel()
    rem = n % blocksize
    if rem == 0:
        return (values.view(-1, blocksize) * absmax.view(-1, 1)).reshape(n)
    full = n - rem
    blocks = full // blocksize
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[:blocks].view(-1, 1)).reshape(full)
    out[full:] = values[full:] * absmax[blocks]
    return out


def nested_absmax(state: State4bit, qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor):  # noqa: ANN201
    """fp32 absmax of a double-quantized state: nested_map[q] * nested_absmax[block] + offset."""
    import torch

    codes = nested_map.to(torch.float32)[qabsmax.reshape(-1).to(torch.int64)]
    absmax = _blockwise(codes, nested_absmax.to(torch.float32).reshape(-1), state.nested_blocksize or 256)
    absmax += torch.tensor(float(state.nested_offset or 0.0), dtype=torch.float32)
    return absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, state: State4bit):  # noqa: ANN201
    """The weight of ``state.shape`` in ``state.dtype``; ``absmax`` already fp32 (nested resolved).

    Each byte holds two codes (high nibble first): one gather through a 256×2 table of code values gives
    both, then every block is scaled in place (the same fp32 products as bitsandbytes).
    """
    import torch

    data = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    n = math.prod(state.shape)
    if data.numel() * 2 < n:
        raise FormatError(f"packed 4-bit data holds {data.numel() * 2} values, the shape {state.shape} needs {n}")
    code = quant_map.to(torch.float32).reshape(-1)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # byte -> (high, low) values
    values = pairs.index_select(0, data.to(torch.int32)).reshape(-1)  # (index_select: faster than [] here)
    if values.numel() != n:
        values = values[:n].contiguous()
    out = _scale_blocks(values, absmax.to(torch.float32).reshape(-1), state.blocksize)
    return out.reshape(state.shape).to(getattr(torch, state.dtype))


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values`` (fp32, owned) times ``absmax[i // blocksize]`` in place; the last block may be short."""
    n = values.numel()
    full = n - n % blocksize
    if full:
        values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].view(-1, 1))
    if full < n:
        values[full:].mul_(absmax[full // blocksize])
    return values


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and values scaled into [-1, 1] (bitsandbytes' quantize_4bit/blockwise prologue)."""
    import torch

    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    com = flat[:full].reshape(full // blocksize, blocksize)
    absmax = com.abs().max(dim=-1)[0]
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_4bit(weight: torch.Tensor, quant_map: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 (n/2, 1), absmax fp32)`` of ``weight`` with the 4-bit code ``quant_map``.

    ``weight`` should already be in the state's dtype (bitsandbytes quantizes the stored-dtype tensor).
    """
    import torch

    code = quant_map.to(torch.float32)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    absmax, scaled = _scaled_blocks(weight.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if bool((order != torch.arange(order.numel())).any()):  # fp4's code is not sorted; nf4's is
        q = order.to(torch.int32)[q]
    q = q.to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    return packed, absmax


def quantize_nested(absmax: torch.Tensor, nested_map: torch.Tensor, nested_blocksize: int):  # noqa: ANN201
    """Double quantization of fp32 absmax: ``(q uint8, nested_absmax fp32, offset float)``.

    bitsandbytes' CPU kernel (``quantize_cpu_impl``, 0.50) picks each code through a 65,536-bin table of
    [-1, 1] (bin i holds -1 + 2i/65535; its code is the number of code midpoints below it) indexed by
    ``(v + 1) · 0.5 · 65535 + 0.5`` truncated, not by the exact nearest code: the same here, in fp32.
    """
    import torch

    offset = absmax.mean()
    flat = (absmax - offset).reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // nested_blocksize)
    padded = torch.zeros(blocks * nested_blocksize, dtype=torch.float32)
    padded[:n] = flat
    tiles = padded.view(blocks, nested_blocksize)
    nabs = tiles.abs().amax(dim=1)
    scaled = (tiles * (1.0 / nabs).unsqueeze(1)).clamp(-1.0, 1.0)
    index = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64).clamp(0, 65535)
    q = _code_table(nested_map)[index]
    q[nabs == 0] = 0
    return q.reshape(-1)[:n].contiguous(), nabs, offset.item()


def _code_table(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: for each of 65,536 points of [-1, 1], its code index."""
    import torch

    c = code.to(torch.float32)
    midpoints = 0.5 * (c[:-1] + c[1:])
    points = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(midpoints, points, side="left").to(torch.uint8)


def dequantize_int8(q: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8 row-wise: (q * SCB[row]) * (1/127) in fp32, exactly as bitsandbytes computes it."""
    import torch

    return q.to(torch.int8) * scb.to(torch.float32).view(-1, 1) * INV_127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 of ``weight`` (bitsandbytes' int8_vectorwise_quant, threshold 0): ``(q, SCB)``."""
    import torch

    row_stats = torch.max(weight.abs(), dim=1).values.float()
    q = torch.round(weight * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    return q, row_stats
