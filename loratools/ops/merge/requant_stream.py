"""``--requantize`` of an MXFP4 stack of experts a run of experts at a time: memory O(one run), not O(E).

MXFP4 blocks are 32 values along the input dimension of one expert's row, so each expert requantizes on its
own: a run's new blocks and scales are the bytes the whole-tensor requantize makes for those experts. Each run
is read (``pread``), dequantized, merged, requantized and dequantized back; its blocks go to the spill file
at once (the scales, 1/16 of them, are kept and written after), and ρ = ⟨Q(W+ΔW) − Q(W), ΔW⟩ / ‖ΔW‖² is
accumulated from the runs' float64 sums. A damaged base or an overflowing merge is refused by the
whole-tensor path (:func:`.requant_write._new_tensors`), so the message is the whole tensor's.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

#: experts per run (None: as many as fit :data:`.stacked.RUN_BYTES` of fp32); tests force 1
RUN_EXPERTS: int | None = None


def stream_requantized(
    reader: Any, key: str, job: Any, report: Any, spill: Any, pos: int, merge: Any
) -> tuple[dict, int] | None:
    """Write ``key``'s requantized parts to ``spill`` from byte ``pos``; returns (raw -> (pos, entry), new
    pos), or None when ``key`` is not a streamable MXFP4 stack with plain expert updates. ``merge(job, w,
    where)`` is the whole path's fp32 merge with its finite check (:func:`.requant_write._merged`)."""
    from loratools.ops.merge.quant_stream import STREAMED, _raw
    from loratools.ops.merge.stacked import RUN_BYTES, _stacked

    q = reader.quant
    t = q.tensors.get(key)
    if t is None or t.scheme not in STREAMED or len(t.shape) != 3 or not t.shape[0] or not _stacked(job):
        return None
    raws = {role: _raw(reader, k) for role, k in t.parts.items()}
    if set(raws) != {"weight", "scales"} or not all(i.shape and i.shape[0] == t.shape[0] for i in raws.values()):
        return None
    per = RUN_EXPERTS or max(1, RUN_BYTES // (math.prod(t.shape[1:]) * 4))
    base = SimpleNamespace(fds={})
    try:
        return _write(reader, t, raws, job, per, base, report, spill, pos, merge)
    finally:
        for fd in base.fds.values():
            os.close(fd)


def _write(
    reader: Any, t: Any, raws: dict, job: Any, per: int, base: Any, report: Any, spill: Any, pos: int, merge: Any
):  # noqa: ANN202, E501
    import torch

    from loratools.checkpoint.quant import checks
    from loratools.checkpoint.quant.mxfp4 import quantize_blocks
    from loratools.checkpoint.writer import TensorEntry, tensor_bytes
    from loratools.files.safetensors_file import dtype_name, torch_dtype
    from loratools.ops.merge.quant_report import ModuleRow
    from loratools.ops.merge.quant_stream import _read_rows

    at = reader.quant.part_namer(t)
    where, stored = at("weight"), torch_dtype(t.dtype)
    experts, d1, d2 = t.shape
    start, scales, sq, moved = pos, [], 0.0, 0.0
    # bf16 holds every MXFP4 value its range check lets through exactly: such runs dequantize straight into
    # fp32 (the same values), and the range check (check_values) is their finite check
    wide = torch.float32 if stored in (torch.bfloat16, torch.float32) else stored
    for e0 in range(0, experts, per):
        count = min(per, experts - e0)
        parts = {role: _read_rows(base, reader, t.parts[role], raws[role], e0, count) for role in ("weight", "scales")}
        checks.check_values(t, parts, at)
        deq = _dequantized(parts["weight"], parts["scales"], (count, d1, d2), wide, where)
        sub = replace(
            job,
            deltas=[replace(c, expert=c.expert - e0) for c in job.deltas if e0 <= c.expert < e0 + count],
            shape=(count, d1, d2),
        )
        merged = merge(sub, deq, where)
        blocks, sc = quantize_blocks(merged)
        new = {"weight": blocks, "scales": sc}
        checks.check_values(t, new, at)
        back = _dequantized(blocks, sc, (count, d1, d2), wide, where)
        delta = merged.sub_(deq)
        for lo in range(0, delta.numel(), DOT_CHUNK):  # float64 sums, a cache-sized piece at a time
            d = delta.view(-1)[lo : lo + DOT_CHUNK].to(torch.float64)
            sq += float(d.dot(d))
            b = back.view(-1)[lo : lo + DOT_CHUNK].to(torch.float64)
            moved += float(b.sub_(deq.view(-1)[lo : lo + DOT_CHUNK].to(torch.float64)).dot(d))
        data = tensor_bytes(blocks)
        spill.write(data)
        pos += data.nbytes
        scales.append(sc)
    kb, ks = t.parts["weight"], t.parts["scales"]
    out = {kb: (start, TensorEntry(kb, dtype_name(torch.uint8), tuple(raws["weight"].shape)))}
    data = tensor_bytes(torch.cat(scales).contiguous())
    out[ks] = (pos, TensorEntry(ks, dtype_name(torch.uint8), tuple(raws["scales"].shape)))
    spill.write(data)
    pos += data.nbytes
    report.rows.append(ModuleRow(t.key, t.scheme, math.sqrt(sq), rho=1.0 if sq == 0.0 else moved / sq))
    return out, pos


#: elements of ΔW per float64 dot product of ρ's sums
DOT_CHUNK = 1 << 16


def _dequantized(blocks: Any, scales: Any, shape: tuple, dtype: Any, where: str) -> Any:
    """A run dequantized into ``dtype``; checked for NaN/Inf unless into fp32 (bounded by the range check)."""
    import torch

    from loratools.checkpoint.quant import checks
    from loratools.checkpoint.quant.mxfp4 import dequantize_into

    w = dequantize_into(blocks, scales, torch.empty(shape, dtype=dtype))
    return w if dtype == torch.float32 else checks.check_dequantized(w, where).float()


__all__ = ["stream_requantized"]
