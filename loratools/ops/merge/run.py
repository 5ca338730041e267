"""Streaming merge of LoRA adapters into a base checkpoint: W' = W + Σ w_i·scale_i·B_i·A_i.

Data flows one way: reader -> keymap (``load_lean``: ``load_adapter(..., base=reader)`` with the factors
left in their files, each checked once) -> plan (validated in full before anything is written) -> layout
-> writer (factors read back per module) -> publish. Tensors no adapter touches are copied byte
for byte in the kernel; touched ones are read into a private buffer (not the page-cache map, so peak
RSS stays at one tensor), updated in fp32 in factor space and cast once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.args.numeric_args import check_weights
from loratools.errors import UsageError, VerificationError
from loratools.ops.merge.summary import MergeSummary

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter
    from loratools.ops.merge.layout import Unit

DTYPE_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _is_onnx(path: Path) -> bool:
    return path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file())


def merge(
    base: str | Path,
    adapters: Sequence[str | Path | Adapter],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    dtype: str = "auto",
    max_shard_size: str | int | None = None,
    device: str = "cpu",
    verify: bool = False,
    overwrite: bool = False,
    include: str | None = None,
    exclude: str | None = None,
    trust_tensors: bool = False,
    skip_modules: Sequence[str] = (),
    progress: Callable[[int], contextlib.AbstractContextManager[Callable[[int], None]]] | None = None,
    requantize: bool = False,
    reference: str | Path | None = None,
    into: str = "base",
    allow_alora: bool = False,
) -> MergeSummary:
    """Merge ``adapters`` into ``base`` and publish the result at ``output`` atomically.

    ``weights`` (one per adapter, default 1; negative subtracts) scale each adapter's update.
    ``dtype`` ``auto`` keeps every tensor's dtype; ``fp32``/``fp16``/``bf16`` cast every float tensor.
    ``max_shard_size`` (``5GB``, ``500MB``, ``2GiB``) reshards; by default the base's shard names are kept.
    ``device="cuda"`` computes updates on the GPU. ``verify`` checks the output before publishing.
    ``progress(total_bytes)`` may return a context manager yielding ``advance(n_bytes)``.
    A quantized base (bitsandbytes, FP8, GPTQ, AWQ) is dequantized: deq(Wq) + ΔW in its compute dtype;
    ``requantize``, ``reference`` (its 16-bit base) and ``into`` are described in :mod:`.quantized`.
    An ONNX ``base`` goes to :func:`loratools.onnx.patch.merge_onnx` with every option (``skip_modules``
    is only for it); it refuses the options a graph has no use for.
    An activated LoRA (aLoRA) is refused unless ``allow_alora``: merged, it acts on every token.
    """
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.checkpoint.writer import parse_size
    from loratools.model.alora import refuse_merge
    from loratools.ops.merge.factors import FactorStore, load_for_merge, release_memory
    from loratools.ops.merge.files import copy_other_files, other_files
    from loratools.ops.merge.plan import build_plan
    from loratools.ops.merge.write import torch_threads, write_unit
    from loratools.publishing.hub import resolve_path
    from loratools.publishing.publish import atomic_output

    t0 = time.perf_counter()
    base_path = resolve_path(base, "base checkpoint")
    refuse_merge(adapters, allow_alora)
    if _is_onnx(base_path):
        from loratools.onnx.patch import merge_onnx

        # a named .onnx file stays the user's choice (its folder may hold several graphs)
        return merge_onnx(
            base_path, list(adapters), output, weights=weights, overwrite=overwrite, trust_tensors=trust_tensors,
            include=include, exclude=exclude, skip_modules=skip_modules, verify=verify, dtype=dtype,
            max_shard_size=max_shard_size, device=device,
        )  # fmt: skip
    from loratools.ops.merge.gguf import is_gguf_base

    if is_gguf_base(base_path) and not skip_modules:
        from loratools.ops.merge.gguf import merge_gguf

        if dtype != "auto" or max_shard_size or device != "cpu" or requantize or reference or into != "base":
            raise UsageError(
                "merging into a GGUF model keeps each tensor's own type in one file on the CPU",
                hint="leave out --dtype, --max-shard-size, --device, --requantize, --reference and --into",
            )
        return merge_gguf(
            base_path, list(adapters), output, weights=weights, verify=verify, overwrite=overwrite,
            include=include, exclude=exclude, trust_tensors=trust_tensors,
        )  # fmt: skip
    if skip_modules:
        raise UsageError(
            "--skip-module is for merging into an ONNX model (modules its export left out)",
            hint="leave a module out of a checkpoint merge with --exclude REGEX",
        )
    if not adapters:
        raise UsageError("merge needs at least one adapter")
    quant_base = None  # with --reference/--into: the quantized base the report is about
    if requantize or reference is not None or into != "base":
        from loratools.ops.merge.quantized import check_quant_options, merge_requantized

        check_quant_options(base_path, requantize, reference, into, dtype, max_shard_size, verify, device)
        if requantize:
            def meta(reader: CheckpointReader, w: list[float]) -> dict[str, str]:
                return _provenance(base, base_path, reader, adapters, w, "requantize", None, include, exclude)

            done = merge_requantized(
                base_path, adapters, output, meta, reference=reference, weights=weights, overwrite=overwrite,
                include=include, exclude=exclude, trust_tensors=trust_tensors, progress=progress,
            )  # fmt: skip
            return MergeSummary(output=Path(output), seconds=time.perf_counter() - t0, **done)
        quant_base = base_path
        if into == "reference":
            base = reference
            base_path = resolve_path(reference, "reference checkpoint")
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
            reader, adapters, factors, include=include, exclude=exclude, trust_tensors=trust_tensors
        )
        plan = build_plan(reader, loaded, weights)
        if reader.kind == "file" and shard_bytes:
            raise UsageError("--max-shard-size needs a model folder base, not a single file")
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


def _describe_base(base: str | Path, reader: CheckpointReader) -> dict[str, Any]:
    """The base's weight files by name, size and sha256 of their safetensors header (not all bytes: speed)."""
    import hashlib

    from loratools.publishing.hub import hub_info_for
    from loratools.publishing.publish import file_digest

    hub = hub_info_for(base)  # a Hub base: its repo id and commit identify it
    if hub:
        return dict(hub)
    root = reader.root if reader.root.is_dir() else reader.root.parent
    files = []
    for f in reader.files:
        rel = f.relative_to(root).as_posix()
        if f.suffix != ".safetensors":
            files.append({**file_digest(f), "path": rel})
            continue
        with open(f, "rb") as fh:
            head = fh.read(8)
            head += fh.read(int.from_bytes(head, "little"))
        files.append({"path": rel, "size": f.stat().st_size, "sha256_header": hashlib.sha256(head).hexdigest()})
    return {"path": str(base), "files": files}


def _provenance(base, base_path, reader, adapters, weights, dtype, max_shard_size, include, exclude) -> dict[str, str]:  # noqa: ANN001
    from loratools.publishing.publish import describe_input, provenance, provenance_metadata

    described = [
        describe_input(a) if isinstance(a, str | Path) else {"source": str(a.meta.get("source"))} for a in adapters
    ]
    record = provenance(
        "merge",
        {
            "weights": list(weights),
            "dtype": dtype or "auto",
            "max_shard_size": max_shard_size,
            "include": include,
            "exclude": exclude,
        },
        {"base": _describe_base(base, reader), "adapters": described},
    )
    return provenance_metadata(record)


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
