"""Writing a requantized merge: touched modules' new parts to a spill file, then each output file
assembled in the base's own tensor order from base byte ranges (untouched, copied in the kernel) and
spill ranges (touched). One module's tensors are in memory at a time."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.reader import CheckpointReader
    from loratools.ops.merge.factors import FactorStore
    from loratools.ops.merge.plan import MergePlan
    from loratools.ops.merge.quant_report import QuantReport

SPILL = ".loratools-requant-spill"


def _new_tensors(
    reader: CheckpointReader, key: str, job: Any, report: QuantReport, ref: Any
) -> dict[str, torch.Tensor]:
    """Raw key -> new tensor for one touched job (a quantized module's parts, or one float tensor)."""
    import torch

    from loratools.checkpoint.quant.layout import dequantize
    from loratools.checkpoint.quant.requant import requantize
    from loratools.errors import NumericError
    from loratools.files.safetensors_file import torch_dtype
    from loratools.ops.merge.quant_report import ModuleRow, gap_ratio, share_surviving

    q = reader.quant
    if key not in q.tensors:  # a 16-bit tensor of the quantized base (lm_head, a bias): merged as usual
        info = reader.info(key)
        merged = _merged(job, reader.get(key), f"{reader.file_of(key)}: {key}", plain=False)
        return {key: merged.to(torch_dtype(info.dtype))}
    t = q.tensors[key]
    old = q.read_parts(t)
    at = q.part_namer(t)
    where = at("weight")
    deq = dequantize(t, old, torch.float32, at)
    merged = _merged(job, deq, where)
    new = requantize(t, merged, old, where)
    try:
        back = dequantize(t, new, torch.float32, at)
    except NumericError:  # the base was checked above: the merged values broke the new state
        raise NumericError(
            f"{where}: the merged weight (max |value| {float(merged.abs().max()):.3g}) overflows the "
            f"{t.scheme} scales it is requantized with",
            hint="lower the adapter's weight, or merge without --requantize (a 16-bit checkpoint)",
        ) from None
    delta = merged.sub_(deq)  # ΔW as the merge applied it (merged is not needed any more)
    norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
    row = ModuleRow(key, t.scheme, norm, rho=share_surviving(back, deq, delta))
    if ref is not None:
        check_reference(ref, key, reader)
        row.gap = gap_ratio(ref.get(key).float(), deq, norm)
    report.rows.append(row)
    return {t.parts[role]: tensor.contiguous() for role, tensor in new.items()}


def _merged(job: Any, w: torch.Tensor, where: str, plain: bool = True) -> torch.Tensor:
    """``w`` + the job's update in fp32, refused (naming ``where``: file and tensor) unless finite."""
    import torch

    from loratools.errors import NumericError
    from loratools.model.finite import first_nonfinite
    from loratools.ops.merge.plan import compute

    try:
        merged = _plain_sum(job, w) if plain else None
        if merged is None:  # compute() refuses NaN/Inf itself (the same fp32 sum): not summed twice
            return compute(job, w)
    except NumericError as exc:
        raise NumericError(f"{where}: {exc.message}", hint=exc.hint) from None
    if not bool(torch.isfinite(merged.sum())) and first_nonfinite(merged) is not None:
        raise NumericError(
            f"{where}: merging into it produced NaN or Inf values", hint="the adapter holds extreme values"
        )
    return merged


def _plain_sum(job: Any, deq: torch.Tensor) -> torch.Tensor | None:
    """deq + Σ (B·A)·coef in PEFT's order of operations (its bnb merge: delta first, then one add), so
    a requantized module is bit-equal to PEFT's merge_and_unload; None for DoRA and other special jobs."""
    if job.dora is not None or job.replacement is not None or job.biases or deq.ndim != 2:
        return None
    if any(not hasattr(c.lora, "factors") for c in job.deltas):  # LoHa, LoKr, OFT, ...: compute()
        return None
    if any(getattr(c, "rows", None) is not None for c in job.deltas):
        return None
    import torch

    delta = None
    for c in job.deltas:
        up, down = c.lora.factors(torch.float32)
        d = up @ down
        d = (d.T if c.lora.transposed else d) * c.coefficient
        delta = d if delta is None else delta.add_(d)
    return deq + delta if delta is not None else deq.clone()


def write_requantized(
    reader: CheckpointReader,
    plan: MergePlan,
    factors: FactorStore,
    tmp: Path,
    single: bool,
    meta: dict[str, str],
    report: QuantReport,
    ref: Any,
    progress: Any,
) -> tuple[int, list[str], int]:
    """Write every base file again under ``tmp``; returns (bytes written, file names, tensors written)."""
    import contextlib

    import torch

    from loratools.checkpoint.writer import SafetensorsWriter, ShardPlan, TensorEntry, tensor_bytes, write_index
    from loratools.files.safetensors_file import dtype_name

    spill_path = (tmp.parent if single else tmp) / (SPILL if not single else tmp.name + SPILL)
    spilled: dict[str, tuple[int, TensorEntry]] = {}
    pos = 0
    total = sum(f.stat().st_size for f in reader.files)
    ctx = progress(total) if progress is not None else contextlib.nullcontext(lambda n: None)
    try:
        with ctx as advance, open(spill_path, "wb") as spill:
            for key in sorted(reader.quant.tensors):  # copied as stored, but only if it dequantizes cleanly
                if key not in plan.jobs or plan.jobs[key].is_copy:
                    reader.quant.get(key, torch.float32)
            for key, job in sorted(plan.jobs.items()):
                if job.is_copy:
                    continue
                streamed = _streamed(reader, key, factors.resolve(job), report, ref, spill, pos)
                if streamed is not None:
                    spilled.update(streamed[0])
                    pos = streamed[1]
                    continue
                for raw, tensor in _new_tensors(reader, key, factors.resolve(job), report, ref).items():
                    data = tensor_bytes(tensor)
                    spill.write(data)
                    spilled[raw] = (pos, TensorEntry(raw, dtype_name(tensor.dtype), tuple(tensor.shape)))
                    pos += data.nbytes
            spill.flush()
            written, names, count = 0, [], 0
            out_plan = ShardPlan()
            for f in reader.files:
                keys = sorted(
                    (k for k, p in reader.raw_weight_map.items() if p == f), key=lambda k: _raw(reader, k).start
                )
                entries = []
                for k in keys:
                    info = _raw(reader, k)
                    entries.append(spilled[k][1] if k in spilled else TensorEntry(k, info.dtype, tuple(info.shape)))
                _check_alignment(f, entries)
                dest = tmp if single else tmp / f.name
                meta_f = {**reader.metadata(f), **meta}
                meta_f.setdefault("format", "pt")
                with SafetensorsWriter(dest, entries, meta_f) as w:
                    for k in keys:
                        if k in spilled:
                            w.copy(k, spill_path, spilled[k][0])
                        else:
                            w.copy(k, f, _raw(reader, k).start)
                written += w.bytes_written
                names.append(Path(dest).name if single else f.name)
                count += len(entries)
                out_plan.files[f.name] = entries
                advance(f.stat().st_size)
    finally:
        spill_path.unlink(missing_ok=True)
    if reader.index is not None and not single:
        idx_meta = reader.index.get("metadata") if isinstance(reader.index, dict) else None
        index_path = tmp / "model.safetensors.index.json"
        write_index(index_path, out_plan, {k: v for k, v in (idx_meta or {}).items() if k != "total_size"})
        written += index_path.stat().st_size
    return written, sorted(names), count


def _streamed(reader: Any, key: str, job: Any, report: Any, ref: Any, spill: Any, pos: int) -> Any:
    """An MXFP4 expert stack requantized a run of experts at a time (:mod:`.requant_stream`), or None. A
    NumericError rewinds the spill and leaves the tensor to the whole-tensor path, which names it whole."""
    from loratools.errors import NumericError
    from loratools.ops.merge.requant_stream import stream_requantized

    if ref is not None:
        return None
    rows = len(report.rows)
    try:
        return stream_requantized(reader, key, job, report, spill, pos, _merged)
    except NumericError:
        del report.rows[rows:]
        spill.seek(pos)
        spill.truncate()
        return None


def check_reference(ref: CheckpointReader, key: str, reader: CheckpointReader) -> None:
    """``ref`` is a 16-bit checkpoint with ``key`` in the quantized base's logical shape."""
    from loratools.errors import ShapeError, UsageError, ValidationError

    if ref.quant is not None:
        raise UsageError(f"--reference {ref.root} is quantized too; give the 16-bit base it was quantized from")
    if key not in ref:
        raise ValidationError(f"--reference {ref.root} has no tensor {key}", hint="give the 16-bit base of this model")
    want = tuple(reader.quant.tensors[key].shape)
    if tuple(ref.info(key).shape) != want:
        raise ShapeError(
            f"--reference {ref.root}: {key} is {tuple(ref.info(key).shape)}, the quantized base's is {want}",
            hint="give the 16-bit base this checkpoint was quantized from",
        )


def _check_alignment(f: Path, entries: list[Any]) -> None:
    """Every tensor must start at a multiple of its element size (readers refuse it otherwise); a longer
    4-bit state JSON before a wider tensor would break that."""
    from loratools.errors import UnsupportedError
    from loratools.files.safetensors_file import DTYPES

    pos = 0
    for e in entries:
        size = DTYPES[e.dtype][1]
        if pos % size:
            raise UnsupportedError(
                f"{f.name}: requantizing moves {e.name} off its {size}-byte alignment (a quant state grew and "
                "this file stores wider tensors after it)",
                hint="merge without --requantize (a 16-bit checkpoint)",
            )
        pos += e.nbytes


def _raw(reader: CheckpointReader, key: str) -> Any:
    return reader._file(reader.raw_weight_map[key]).info(key)


__all__ = ["check_reference", "write_requantized"]
