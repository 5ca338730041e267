"""The streaming merge into a safetensors checkpoint (folder, sharded, pipeline, single file, quantized read
dequantized): load the adapters lean -> plan (validated in full) -> layout -> write unit by unit -> publish.

Tensors no adapter touches are copied byte for byte in the kernel; touched ones are read into a private buffer
(not the page-cache map, so peak RSS stays at one tensor), updated in fp32 in factor space and cast once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.args.numeric_args import check_weights
from loratools.errors import UsageError, VerificationError
from loratools.ops.merge.provenance import merge_provenance as _provenance
from loratools.ops.merge.summary import MergeSummary

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter
    from loratools.ops.merge.layout import Unit
    from loratools.ops.merge.options import MergeOptions

DTYPE_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def merge_checkpoint(
    base: str | Path,
    base_path: Path,
    adapters: Sequence[str | Path | Adapter],
    output: str | Path,
    options: MergeOptions,
    *,
    quant_base: Path | None = None,
) -> MergeSummary:
    """Merge ``adapters`` into the checkpoint at ``base_path`` (``base`` as the user named it, for provenance).

    ``quant_base``: the quantized base a ``--reference``/``--into`` report is about (``base`` is then the
    reference when merging into it).
    """
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.checkpoint.writer import parse_size
    from loratools.ops.merge.base_dtypes import settle_base_dtypes
    from loratools.ops.merge.factors import FactorStore, load_for_merge, release_memory
    from loratools.ops.merge.files import copy_other_files, other_files
    from loratools.ops.merge.pipeline import torch_threads
    from loratools.ops.merge.plan import build_plan
    from loratools.ops.merge.write import write_unit
    from loratools.publishing.publish import atomic_output

    t0 = time.perf_counter()
    o = options
    weights, dtype, max_shard_size, include, exclude = o.weights, o.dtype, o.max_shard_size, o.include, o.exclude
    trust_tensors, verify, overwrite, progress = o.trust_tensors, o.verify, o.overwrite, o.progress
    reference, into, device = o.reference, o.into, o.device
    weights = check_weights(weights, len(adapters))
    out_dtype = None if dtype in (None, "auto") else DTYPE_NAMES.get(str(dtype).lower())
    if dtype not in (None, "auto") and out_dtype is None:
        raise UsageError(f"--dtype {dtype!r} is not one of auto, fp32, fp16, bf16")
    shard_bytes = parse_size(max_shard_size) if max_shard_size else None
    dev = _device(device)

    threads = torch_threads()
    threads.__enter__()
    reader = open_checkpoint(base_path)
    factors = FactorStore()
    try:
        loaded = load_for_merge(
            reader, adapters, factors, include=include, exclude=exclude, trust_tensors=trust_tensors,
            allow_other_base=o.allow_other_base,
        )  # fmt: skip
        plan = build_plan(reader, loaded, weights, read=factors.read)
        notes = settle_base_dtypes(reader, plan, out_dtype)
        meta = _provenance(base, base_path, reader, adapters, weights, dtype, max_shard_size, include, exclude)
        units = _layout(reader, plan, out_dtype, shard_bytes, meta)
        release_memory()
        single = reader.kind == "file"
        total = sum(e.nbytes for u in units for f in u.files for e in f.entries)
        others, left_out = ([], []) if single else other_files(base_path, units)
        extra = sum(p.stat().st_size for _, p in others)
        inputs = [base_path, *[Path(a) for a in adapters if isinstance(a, str | Path)]]
        written = 0
        with atomic_output(
            output, overwrite=overwrite, inputs=inputs, directory=not single, expected_bytes=total + extra
        ) as tmp:
            ctx = progress(total) if progress is not None else contextlib.nullcontext(lambda n: None)
            with ctx as advance:
                for unit in units:
                    written += write_unit(reader, unit, tmp, single, dev, advance, factors)
            if not single:
                written += copy_other_files(base_path, tmp, units, plan, out_dtype, reader.quant is not None)
            report = None
            if verify:
                from loratools.ops.verify import verify as run_verify

                merged = tmp
                if single:  # its temporary name does not end in .safetensors: verify it through a named link
                    merged = tmp.with_name(tmp.name + ".safetensors")
                    merged.symlink_to(tmp.name)
                try:
                    report = run_verify(merged, reader, [factors.materialized(a) for a in loaded], weights)
                finally:
                    if single:
                        merged.unlink(missing_ok=True)
                if not report.verified:
                    raise VerificationError(
                        f"the merged output failed verification: {report.summary()}",
                        hint="nothing was published; rerun with LORATOOLS_DEBUG=1 and report this as a bug",
                    )
        changed = sum(1 for j in plan.jobs.values() if not j.is_copy)
        return MergeSummary(
            output=Path(output),
            modules_merged=plan.modules_merged,
            tensors_changed=changed,
            tensors_written=sum(len(f.entries) for u in units for f in u.files),
            bytes_written=written,
            seconds=time.perf_counter() - t0,
            files=sorted(f.rel or Path(output).name for u in units for f in u.files),
            untied=plan.untied,
            verify=report,
            left_out=left_out,
            notes=notes,
            quant=_quant_report(reader, quant_base, adapters, weights, reference, into, include, exclude, trust_tensors),  # noqa: E501
        )
    finally:
        factors.close()
        reader.close()
        threads.__exit__(None, None, None)


def _quant_report(reader, quant_base, adapters, weights, reference, into, include, exclude, trust) -> Any:  # noqa: ANN001
    """The quantized base's scheme (a dequantized merge), and per-module gaps with ``--reference``."""
    if quant_base is None:
        if reader.quant is None:
            return None
        from loratools.ops.merge.quant_report import QuantReport

        brief = {k: v for k, v in reader.quant.summary().items() if k != "quantized"}
        return QuantReport(reader.quant.scheme, "16-bit", "quantized", brief)
    from loratools.ops.merge.quantized import quant_report

    into_name = "reference" if into == "reference" else "quantized"
    return quant_report(quant_base, adapters, weights, reference, into_name, include, exclude, trust)


def _device(device: str) -> Any:
    from loratools.args.devices import torch_device  # one refusal, worded the same by every command

    return torch_device(device)


def _layout(reader, plan, out_dtype, shard_bytes, meta) -> list[Unit]:  # noqa: ANN001
    from loratools.ops.merge.layout import layout_unit

    if reader.kind != "pipeline":
        return [
            layout_unit(
                reader,
                plan,
                out_dtype=out_dtype,
                max_shard_size=shard_bytes,
                metadata=meta,
                single_file=reader.kind == "file",
            )
        ]
    units = []
    for name, comp in reader.components.items():
        prefix = f"{name}."
        touched = any(k.startswith(prefix) and not j.is_copy for k, j in plan.jobs.items())
        if touched or out_dtype:
            units.append(
                layout_unit(
                    comp,
                    plan,
                    prefix=prefix,
                    subdir=comp.root.relative_to(reader.root).as_posix(),
                    out_dtype=out_dtype,
                    max_shard_size=shard_bytes,
                    metadata=meta,
                )
            )
    return units
