"""A quantized stack of experts merged to 16-bit a run of experts at a time: memory O(one expert slice).

An MXFP4 expert tensor (gpt-oss ``<param>_blocks`` (E, rows, in/32, 16) and ``<param>_scales`` (E, rows,
in/32)) keeps each expert's codes and scales in one contiguous byte range of dimension 0, as a 16-bit stack
does. So the 16-bit merge reads a run of experts' blocks and scales (``pread``), dequantizes them into a
recycled buffer (:func:`~loratools.checkpoint.quant.mxfp4.dequantize_into`, a few rows at a time), applies that
run's updates in place and hands the run to the writer as the next piece of the output tensor, like
:mod:`.stacked` does for a 16-bit stack. Before, the whole (E, in, out) tensor was dequantized (with int64 and
fp32 temporaries ~5× its fp32 size) and merged at once.

The bytes equal the whole-tensor merge's: dequantization is elementwise, the checks are the same
(:func:`~loratools.checkpoint.quant.checks.check_values` / ``check_dequantized``), and ``apply_inplace`` keeps
the whole tensor's row blocks (``first_row``). A damaged run (an E8M0 NaN scale, values beyond the dtype) is
refused with the whole-tensor message: the tensor is dequantized whole once more, then, so the message's
indices are the tensor's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loratools.ops.merge.layout import Source

#: schemes whose stored parts are per expert along dimension 0 (and a dequantize_into to stream them)
STREAMED = ("mxfp4",)
#: dequantized runs in flight: one being written, one queued for the writer, one being merged
RING = 3


def quant_pieces(src: Source, dtype: str, base: Any, prefix: str, dev: Any, factors: Any) -> Iterator | None:
    """``(first expert, tensor)`` pieces of output tensor ``src`` when its source is a streamed quantized stack
    of experts with plain LoRA updates (:func:`.stacked._stacked`), merged on the CPU; else None (made whole)."""
    from loratools.files.safetensors_file import DTYPES
    from loratools.ops.merge.stacked import RUN_BYTES, _stacked

    reader, job = base.reader, src.job
    q = getattr(reader, "quant", None)
    if q is None or job is None or job.source is None or dev is not None or not _stacked(job):
        return None
    t = q.tensors.get(job.source[len(prefix) :])
    if t is None or t.scheme not in STREAMED or len(t.shape) != 3 or not t.shape[0]:
        return None
    raws = {role: _raw(reader, k) for role, k in t.parts.items()}
    if not all(hasattr(i, "start") and i.shape and i.shape[0] == t.shape[0] for i in raws.values()):
        return None
    per_expert = math.prod(t.shape[1:]) * max(DTYPES[dtype][1], DTYPES[t.dtype][1])
    return _runs(t, raws, max(1, RUN_BYTES // per_expert), dtype, base, factors.resolve(job) if factors else job)


def _runs(t: Any, raws: dict[str, Any], per: int, dtype: str, base: Any, job: Any) -> Iterator[tuple[int, Any]]:
    import torch

    from loratools.checkpoint.quant import checks
    from loratools.checkpoint.quant.mxfp4 import dequantize_into
    from loratools.errors import NumericError
    from loratools.files.safetensors_file import torch_dtype
    from loratools.ops.merge.apply import BLOCK_ELEMENTS, apply_inplace, compute

    reader, target, stored = base.reader, torch_dtype(dtype), torch_dtype(t.dtype)
    at = reader.quant.part_namer(t)
    experts, d1, d2 = t.shape
    ring: list[torch.Tensor | None] = [None] * RING
    for turn, e0 in enumerate(range(0, experts, per)):
        count = min(per, experts - e0)
        parts = {role: _read_rows(base, reader, t.parts[role], raws[role], e0, count) for role in t.parts}
        if ring[turn % RING] is None:
            ring[turn % RING] = torch.empty((per, d1, d2), dtype=stored)
        try:
            checks.check_values(t, parts, at)
            run = dequantize_into(parts["weight"], parts["scales"], ring[turn % RING][:count])
            # no NaN/Inf sum of the run: check_values refused an E8M0 NaN scale and any scale whose largest
            # code (6) overflows the stored dtype, so every value is finite (the merged piece is summed anyway)
        except NumericError:
            reader.quant.get(t.key)  # raises the whole tensor's message (its indices); else this run's below
            raise
        sub = replace(
            job,
            deltas=[replace(c, expert=c.expert - e0) for c in job.deltas if e0 <= c.expert < e0 + count],
            shape=(count, d1, d2),
        )
        if run.dtype == target:
            yield e0, apply_inplace(sub, run, base.scratch(BLOCK_ELEMENTS + d2), first_row=e0 * d1)
        else:
            yield e0, compute(sub, run).to(target)


def _raw(reader: Any, key: str) -> Any:
    """The stored tensor ``key``'s header entry (with its byte range, for a safetensors file)."""
    return reader._file(reader.raw_weight_map[key]).info(key)


def _read_rows(base: Any, reader: Any, key: str, info: Any, first: int, count: int) -> torch.Tensor:
    """Rows ``first … first+count-1`` of stored tensor ``key`` (one byte range), read with ``pread``."""
    import os

    import torch

    from loratools.files.safetensors_file import torch_dtype
    from loratools.ops.merge.factors import pread_exact

    path = reader.raw_weight_map[key]
    fd = base.fds.get(path)
    if fd is None:
        fd = base.fds[path] = os.open(path, os.O_RDONLY)
    row = info.nbytes // info.shape[0]
    buf = torch.empty(row * count, dtype=torch.uint8)
    pread_exact(fd, buf, info.start + row * first, path, key)
    return buf.view(torch_dtype(info.dtype)).reshape(count, *info.shape[1:])
