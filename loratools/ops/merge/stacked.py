"""A stacked expert tensor ``(E, d1, d2)`` merged a run of experts at a time: memory O(one expert slice).

A fused expert tensor (gpt-oss ``gate_up_proj``, transformers-5 fused experts) can be larger than everything
else a merge holds together. A slice of a tensor's outer dimension is one contiguous byte range of its
safetensors file, so the tensor is read a run of experts at a time (``pread`` into the recycled buffers of
:class:`~loratools.ops.merge.write.BaseBytes`), each run gets only its own experts' contributions, and goes to
the writer as the next piece of the output tensor (``SafetensorsWriter.write_part``). A run is one expert, or as
many as fit in :data:`RUN_BYTES` when experts are small.

The bytes equal those of the whole-tensor merge: ``apply_inplace`` keeps the whole tensor's row blocks
(``first_row``), so every ``addmm_`` is the call it makes on the whole tensor, and ``compute`` updates one
expert at a time anyway. A cast of a large untouched tensor (``--dtype``) is streamed by rows the same way, and
so is a large 2-D weight with plain LoRA updates (Flux's fused ``linear1``, 132 MB in bf16), in runs of whole row
blocks, each term's rows shifted to the run (issue 21's benchmark: 855 -> 326 MB peak on a 5 GB Flux file).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loratools.ops.merge.layout import Source

#: a write.BaseBytes (not imported: write imports this module)
BaseBytes = Any

#: bytes of base tensor (or of its output, if larger) read per run; a larger expert is one run on its own
RUN_BYTES = 16 << 20


def _stacked(job: Any) -> bool:
    """Plain LoRA updates of experts only: what a run of experts can take without the rest of the tensor."""
    return (
        job.replacement is None
        and not job.biases
        and bool(job.deltas)
        and all(c.expert is not None and hasattr(c.lora, "factors") for c in job.deltas)
        and job.dora is None
        and job.scale == 1
    )


def _plain(job: Any) -> bool:
    """Plain LoRA updates of a 2-D weight (no experts): a run of its rows takes them without the rest."""
    return (
        job.replacement is None
        and not job.biases
        and bool(job.deltas)
        and all(c.expert is None and hasattr(c.lora, "factors") for c in job.deltas)
        and job.dora is None
        and job.scale == 1
    )


def pieces(src: Source, dtype: str, base: BaseBytes, prefix: str, dev: Any, factors: Any) -> Iterator | None:
    """``(first row, tensor)`` pieces that make output tensor ``src`` in order (a 2-D weight's pieces carry a third
    item, True when the piece was checked finite already), or None when it is made whole
    (not a stack of experts or a large 2-D weight with plain updates, not a cast, or not a byte range of a
    safetensors file)."""
    import math

    from loratools.files.safetensors_file import DTYPES
    from loratools.ops.merge.apply import BLOCK_ELEMENTS

    key = (src.key if src.job is None else src.job.source or "")[len(prefix) :]
    if src.job is None and not key:
        return None
    if src.job is not None and (src.job.source is None or not (_stacked(src.job) or _plain(src.job))):
        return None
    rows2d = src.job is not None and _plain(src.job)  # a large Linear weight (Flux's linear1), by rows
    quant = getattr(base.reader, "quant", None)
    if rows2d and dev is None and quant is not None and key in quant.tensors:  # ComfyUI fp8-scaled: by runs too
        return _fp8_pieces(src, key, dtype, base, factors)
    info = base.reader.info(key)
    shape = tuple(info.shape)
    if not hasattr(info, "start") or len(shape) < (1 if src.job is None else 2 if rows2d else 3) or not shape[0]:
        return None
    row = max(info.nbytes, math.prod(shape) * DTYPES[dtype][1]) // shape[0]  # bytes per row, read or written
    if src.job is None and row * shape[0] <= RUN_BYTES:  # a small cast: whole, as before
        return None
    per = max(1, RUN_BYTES // max(1, row))
    if rows2d:  # in place, in whole row blocks of apply_inplace's (the same addmm_ calls: the same bytes)
        if dev is not None or info.dtype != dtype or len(shape) != 2:
            return None
        block = max(1, BLOCK_ELEMENTS // max(1, shape[1]))
        per = max(block, per // block * block)
    return _runs(src, key, shape, per, dtype, base, dev, factors)


def _runs(src, key, shape, per, dtype, base, dev, factors) -> Iterator[tuple[int, torch.Tensor]]:  # noqa: ANN001
    from loratools.files.safetensors_file import torch_dtype
    from loratools.ops.merge.apply import BLOCK_ELEMENTS, apply_inplace, compute

    target = torch_dtype(dtype)
    job = None if src.job is None else factors.resolve(src.job) if factors is not None else src.job
    job = job if job is None or any(c.expert is not None for c in job.deltas) else _fp32_factors(job)
    d1 = shape[1] if len(shape) > 1 else 1
    for e0 in range(0, shape[0], per):
        count = min(per, shape[0] - e0)
        if job is not None and all(c.expert is None for c in job.deltas):  # rows e0 … of a 2-D weight
            yield e0, *_rows2d(job, key, shape, e0, count, base)
            continue
        run = base.get_rows(key, e0, count)
        if job is None:  # a cast
            yield e0, run.to(target)
            continue
        sub = replace(
            job,
            deltas=[replace(c, expert=c.expert - e0) for c in job.deltas if e0 <= c.expert < e0 + count],
            shape=(count, *shape[1:]),
        )
        if dev is None and run.dtype == target and run.is_floating_point():
            yield e0, apply_inplace(sub, run, base.scratch(BLOCK_ELEMENTS + shape[-1]), first_row=e0 * d1)
        else:
            yield e0, compute(sub, run, dev).to(target)


def _fp32_factors(job: Any) -> Any:
    """``job`` with its LoRA factors widened to fp32 once (``LoraModule.factors(fp32)`` is then a no-op), not
    once per half-run: the same values (a 2-D weight's factors are small; experts' are not widened whole)."""
    import torch

    from loratools.model.adapter import LoraModule

    def widen(c: Any) -> Any:
        m = c.lora
        if type(m) is not LoraModule or m.up.dtype == m.down.dtype == torch.float32:
            return c
        return replace(c, lora=replace(m, up=m.up.float(), down=m.down.float()))

    return replace(job, deltas=[widen(c) for c in job.deltas])


def _rows2d(job, key, shape, e0, count, base, fp8=None) -> tuple[torch.Tensor, bool]:  # noqa: ANN001
    """Rows ``e0 … e0+count-1`` of a 2-D weight merged: the base read straight from a map of its file's pages
    into the fp32 blocks and rounded into a ring buffer (no private copy of the base, one pass over it), the
    finite check done on the blocks while they are in cache; the run's second half (at a row-block boundary)
    on a second compute thread where there is a second core. ``fp8``: ``(codes, scale, table, dtype)`` of a ComfyUI
    fp8-scaled weight's rows, dequantized into a work buffer (half by half, on the same threads) first."""
    from loratools.checkpoint.direct_io import ALIGN
    from loratools.ops.merge.apply import BLOCK_ELEMENTS

    drop = None
    if fp8 is not None:
        codes, scale, table, dtype = fp8
        rows = base.work(codes.numel() * dtype.itemsize).view(dtype).view(codes.shape)
    else:
        mapped = base.mapped_rows(key, e0, count)
        if mapped is None:
            run = base.get_rows(key, e0, count)
            _merge_rows(job, shape, e0, run, None, base.scratch(BLOCK_ELEMENTS + shape[-1]))
            return run, False
        rows, drop = mapped
    size = rows.element_size()
    at = None if base.out_offset is None else (base.out_offset + e0 * rows[0].numel() * size)
    phase = None if at is None or at % size else at % ALIGN  # placed like its file position: no staging copy
    lend = base.buffer if base.pool is None else base.pool.lend  # a merge's pool (a deep write queue) or the ring
    out = lend(rows.numel() * size, phase).view(rows.dtype).view(rows.shape)
    block = max(1, BLOCK_ELEMENTS // max(1, shape[1]))
    half = (count // 2 + block - 1) // block * block if count > block else count
    helper = base.helper() if half < count else None
    part = (lambda lo, hi: None) if fp8 is None else (lambda lo, hi: (codes[lo:hi], scale, table))  # noqa: E731
    try:
        if helper is None:
            return out, _merge_rows(job, shape, e0, rows, out, base.scratch(BLOCK_ELEMENTS + shape[-1]), part(0, count))
        second = helper.submit(
            _merge_rows, job, shape, e0 + half, rows[half:], out[half:], base.scratch(BLOCK_ELEMENTS + shape[-1], 1),
            part(half, count),
        )  # fmt: skip
        try:
            ok = _merge_rows(job, shape, e0, rows[:half], out[:half], base.scratch(BLOCK_ELEMENTS + shape[-1]),
                             part(0, half))  # fmt: skip
        finally:
            ok = second.result() and ok
        return out, ok
    finally:
        del rows
        if drop is not None:
            drop()


def _merge_rows(job, shape, e0, rows, out, scratch, fp8=None):  # noqa: ANN001, ANN202
    """``apply_inplace`` on rows ``e0 …`` of the 2-D weight (each term's rows shifted to them) into ``out`` (or in
    place when None); True when the result was checked finite on the way. ``fp8``: ``(codes, scale, table)`` to
    dequantize into ``rows`` first."""
    from loratools.ops.merge.apply import FiniteCheck, apply_inplace

    if fp8 is not None:
        from loratools.checkpoint.quant.comfy_fp8 import dequantize_pairs

        dequantize_pairs(*fp8, out=rows)
    count = rows.shape[0]
    spans = [(c, *(c.rows or (0, shape[0]))) for c in job.deltas]
    deltas = [replace(c, rows=(r0 - e0, r1 - e0)) for c, r0, r1 in spans if r0 < e0 + count and r1 > e0]
    sub = replace(job, deltas=deltas, shape=(count, *shape[1:]))
    check = FiniteCheck(rows.dtype) if out is not None else None
    apply_inplace(sub, rows, scratch, first_row=e0, out=out, check=check)
    return check is not None and check.ok


def _fp8_pieces(src, key, dtype, base, factors) -> Iterator | None:  # noqa: ANN001
    """A ComfyUI fp8-scaled weight merged into its 16-bit dtype by row runs (issue 21: the whole tensor was
    dequantized to fp32 at once, 790 MB peak on the Flux bench): the codes read from a map of the file, each
    run dequantized and rounded once to the 16-bit dtype as the whole-tensor path does (``comfy_fp8.
    dequantize_pairs``: a lookup of those values per pair of codes), then merged like a 16-bit weight's rows:
    the same bytes."""
    from loratools.checkpoint.quant.comfy_fp8 import NAME

    t = base.reader.quant.tensors[key]
    if t.scheme != NAME or t.dtype != dtype or len(t.shape) != 2 or not t.shape[0]:
        return None
    if not hasattr(base.reader.quant.raw_info(t.parts["weight"]), "start"):
        return None
    return _fp8_runs(src, t, base, factors)


def _fp8_runs(src, t, base, factors) -> Iterator[tuple[int, torch.Tensor, bool]]:  # noqa: ANN001
    from loratools.checkpoint.quant import checks
    from loratools.checkpoint.quant.comfy_fp8 import pair_table
    from loratools.files.safetensors_file import torch_dtype
    from loratools.ops.merge.apply import BLOCK_ELEMENTS

    quant = base.reader.quant
    at = quant.part_namer(t)
    parts = quant.read_parts(t, skip=("weight",))
    checks.check_values(t, parts, at)  # the scale's checks, before a code is read (as dequantize does)
    job = _fp32_factors(factors.resolve(src.job) if factors is not None else src.job)
    target, shape, raw = torch_dtype(t.dtype), t.shape, t.parts["weight"]
    table = pair_table(parts["scale"], torch_dtype(quant.raw_info(raw).dtype), target)
    block = max(1, BLOCK_ELEMENTS // max(1, shape[1]))
    per = max(block, RUN_BYTES // max(1, shape[1] * target.itemsize) // block * block)
    whole = None  # an unmappable file: its codes read once, not once per run
    for e0 in range(0, shape[0], per):
        count = min(per, shape[0] - e0)
        mapped = base.mapped_rows(raw, e0, count, raw=True)
        if mapped is None and whole is None:
            whole = quant.raw_get(raw)
        codes, drop = mapped if mapped is not None else (whole[e0 : e0 + count], None)
        try:
            out, ok = _rows2d(job, raw, shape, e0, count, base, fp8=(codes, parts["scale"], table, target))
        finally:
            del codes
            if drop is not None:
                drop()
        if not ok:  # NaN/Inf: the dequantized base's own message first, then the merge's (write._cast_checked)
            rows = base.work(count * shape[1] * target.itemsize).view(target).view(count, shape[1])
            checks.check_dequantized(rows, at("weight"), first_row=e0)
        yield e0, out, ok
