"""Merging into a quantized base: 16-bit output (the default), ``--requantize``, ``--reference``, ``--into``.

A QLoRA adapter was trained against deq(Wq), not against the 16-bit weights the base was quantized
from. The default merge (``merge`` itself: the reader dequantizes each module on the fly) writes
deq(Wq) + ΔW in the base's compute dtype with ``quantization_config`` removed. Here:

- ``requantize``: the same scheme and settings written back (bitsandbytes 4/8-bit, FP8); tensors no
  adapter touches are copied byte for byte; per module ρ says how much of ΔW survived the rounding.
- ``reference``: a 16-bit copy of the base; per module ‖W16 − deq(Wq)‖ / ‖ΔW‖ says how far a merge into
  it would land from what the adapter was trained against, and which base to merge into.
- ``into="reference"``: merge into that 16-bit base instead, with the same report.

The requantized output is written in two passes per merge, still one tensor in memory: the new parts of
touched modules go to a spill file first (a 4-bit state's JSON may change length, so headers wait for
them), then every output file is assembled from base byte ranges and spill ranges in the kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import UnsupportedError, UsageError

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.reader import CheckpointReader
    from loratools.ops.merge.plan import MergePlan, TensorJob
    from loratools.ops.merge.quant_report import QuantReport

INTO = ("base", "reference")


def check_quant_options(
    base: Path, requantize: bool, reference: Any, into: str, dtype: Any, max_shard_size: Any, verify: bool, device: Any
) -> str:
    """Refuse option combinations that do not fit a quantized merge; returns the base's scheme."""
    from loratools.checkpoint.reader import open_checkpoint

    if into not in INTO:
        raise UsageError(f"--into {into!r} is not one of {', '.join(INTO)}")
    if into == "reference" and reference is None:
        raise UsageError("--into reference needs --reference BASE16", hint="give the 16-bit base with --reference")
    if into == "reference" and requantize:
        raise UsageError("--requantize writes the quantized base's scheme; it does not combine with --into reference")
    with open_checkpoint(base) as reader:
        if reader.quant is None:
            what = f"quantized as {reader.quantization}, which loratools cannot read" if reader.quantization else None
            raise UsageError(
                f"{base}: --requantize/--reference/--into need a quantized base; this one is {what or 'not quantized'}",
                hint="pass the bitsandbytes/FP8/GPTQ/AWQ checkpoint as BASE (see docs/quantized.md)",
            )
        scheme = reader.quant.scheme
    if requantize:
        from loratools.checkpoint.quant.requant import refuse_unless_requantizable

        refuse_unless_requantizable(scheme, str(base))
        for flag, value in (("--dtype", dtype), ("--max-shard-size", max_shard_size)):
            if value not in (None, "auto"):
                raise UsageError(f"--requantize keeps the base's files and dtypes; it does not combine with {flag}")
        if verify:
            raise UsageError("--verify checks a 16-bit merge; it does not combine with --requantize")
        if device not in (None, "cpu"):
            raise UsageError("--requantize runs on the CPU", hint="drop --device")
    return scheme


def _load(reader, adapters, weights, include, exclude, factors, trust_tensors=False, other_base=False):  # noqa: ANN001, ANN202
    """Adapters read like ``merge`` reads them (factors left in their files), selected and weighted."""
    from loratools.ops.merge.factors import load_for_merge

    loaded = load_for_merge(
        reader, adapters, factors, include=include, exclude=exclude, trust_tensors=trust_tensors,
        allow_other_base=other_base,
    )  # fmt: skip
    w = [1.0] * len(loaded) if weights is None else [float(x) for x in weights]
    return loaded, w


def _delta(job: TensorJob, shape: tuple[int, ...]) -> torch.Tensor:
    """The job's dense update ΔW (fp32): its contributions applied to zeros (one tensor, transient)."""
    import dataclasses

    import torch

    from loratools.ops.merge.plan import compute

    plain = dataclasses.replace(job, biases=[], replacement=None, deltas=[c for c in job.deltas])
    return compute(plain, torch.zeros(shape, dtype=torch.float32))


def quant_report(
    base: str | Path,
    adapters: Sequence[Any],
    weights: Sequence[float] | None,
    reference: str | Path | None,
    merged_into: str,
    include: str | None = None,
    exclude: str | None = None,
    trust_tensors: bool = False,
) -> QuantReport:
    """Per merged quantized module: ‖ΔW‖ and, with ``reference``, ‖W16 − deq(Wq)‖ / ‖ΔW‖."""
    import torch

    from loratools.checkpoint.reader import open_checkpoint
    from loratools.ops.merge.factors import FactorStore
    from loratools.ops.merge.plan import build_plan
    from loratools.ops.merge.quant_report import ModuleRow, QuantReport, gap_ratio
    from loratools.ops.merge.requant_write import check_reference

    factors = FactorStore()
    with open_checkpoint(base) as reader, contextlib.ExitStack() as stack:
        ref = stack.enter_context(open_checkpoint(reference)) if reference is not None else None
        # the merge this report is about has checked the adapters' base already
        loaded, w = _load(reader, adapters, weights, include, exclude, factors, trust_tensors, other_base=True)
        plan = build_plan(reader, loaded, w)
        report = QuantReport(reader.quant.scheme, "16-bit", merged_into, _brief(reader))
        try:
            for key, job in sorted(plan.jobs.items()):
                if key not in reader.quant.tensors or not job.deltas:
                    continue
                job = factors.resolve(job)
                delta = _delta(job, reader.quant.tensors[key].shape)
                norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
                row = ModuleRow(key, reader.quant.tensors[key].scheme, norm)
                if ref is not None:
                    check_reference(ref, key, reader)
                    row.gap = gap_ratio(ref.get(key).float(), reader.quant.get(key, torch.float32), norm)
                report.rows.append(row)
        finally:
            factors.close()
    return report


def _brief(reader: CheckpointReader) -> dict[str, Any]:
    s = reader.quant.summary()
    return {k: v for k, v in s.items() if k != "quantized"}


def merge_requantized(
    base_path: Path,
    adapters: Sequence[Any],
    output: str | Path,
    provenance: Callable[[CheckpointReader, list[float]], dict[str, str]],
    *,
    reference: str | Path | None = None,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    include: str | None = None,
    exclude: str | None = None,
    trust_tensors: bool = False,
    progress: Any = None,
    allow_other_base: bool = False,
) -> dict[str, Any]:
    """deq(Wq) + ΔW quantized again with the base's own scheme; untouched tensors copied byte for byte.

    Returns the fields of a :class:`~loratools.ops.merge.run.MergeSummary` (``quant``: the report).
    """
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.ops.merge.factors import FactorStore
    from loratools.ops.merge.pipeline import torch_threads
    from loratools.ops.merge.plan import build_plan
    from loratools.ops.merge.quant_report import QuantReport
    from loratools.ops.merge.requant_write import write_requantized
    from loratools.publishing.publish import atomic_output

    factors = FactorStore()
    with open_checkpoint(base_path) as reader, contextlib.ExitStack() as stack:
        ref = stack.enter_context(open_checkpoint(reference)) if reference is not None else None
        try:
            loaded, w = _load(reader, adapters, weights, include, exclude, factors, trust_tensors, allow_other_base)
            plan = build_plan(reader, loaded, w)
            _refuse_layout_changes(plan, reader)
            meta = provenance(reader, w)
            report = QuantReport(reader.quant.scheme, "requantized", "quantized", _brief(reader))
            single = reader.kind == "file"
            inputs = [base_path, *[Path(a) for a in adapters if isinstance(a, str | Path)]]
            expected = sum(f.stat().st_size for f in reader.files)
            with atomic_output(
                output, overwrite=overwrite, inputs=inputs, directory=not single, expected_bytes=expected
            ) as tmp:
                # one compute thread fewer than cores, as the 16-bit merge: on 2 busy cores two OpenMP threads
                # per small chunked op spun on each other (8-expert MXFP4 bench: 173 s at load 3, 32 s on one)
                with torch_threads():
                    written, files, count = write_requantized(
                        reader, plan, factors, Path(tmp), single, meta, report, ref, progress
                    )
                if not single:
                    written += _copy_others(base_path, Path(tmp), reader, plan)
        finally:
            factors.close()
    return {
        "modules_merged": plan.modules_merged,
        "tensors_changed": sum(1 for j in plan.jobs.values() if not j.is_copy),
        "tensors_written": count,
        "bytes_written": written,
        "files": files,
        "quant": report,
    }


def _refuse_layout_changes(plan: MergePlan, reader: CheckpointReader) -> None:
    """--requantize keeps every tensor's name, dtype and place: no new, untied or resized tensors."""
    if plan.new_keys or plan.untied or plan.vocab_size:
        what = sorted(plan.new_keys) or plan.untied or ["a resized vocabulary"]
        raise UnsupportedError(
            f"--requantize keeps the base's tensors as they are; this merge changes the layout ({what[0]})",
            hint="merge without --requantize (a 16-bit checkpoint)",
        )
    for key, job in plan.jobs.items():
        if job.is_copy:
            continue
        if key in reader.quant.tensors and job.replacement is not None:
            raise UnsupportedError(
                f"{key} is quantized and the adapter replaces it in full (modules_to_save)",
                hint="merge without --requantize (a 16-bit checkpoint)",
            )
        if key not in reader.quant.tensors and reader.info(key).dtype not in ("F32", "F16", "BF16"):
            raise UnsupportedError(f"{key} is stored as {reader.info(key).dtype}; it cannot take an update")


def _copy_others(base: Path, tmp: Path, reader: CheckpointReader, plan: MergePlan) -> int:
    """Tokenizer, config (quantization_config kept) and the rest, as the 16-bit merge copies them."""
    from loratools.ops.merge.files import copy_other_files
    from loratools.ops.merge.layout import Unit

    unit = Unit(subdir="", consumed=set(reader.files))
    if reader.index is not None:
        unit.index_name = "model.safetensors.index.json"
    return copy_other_files(base, tmp, [unit], plan, None)
