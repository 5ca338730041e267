"""Quantized checkpoints (bitsandbytes, FP8, GPTQ, AWQ): merged into deq(Wq) and written 16-bit, compared with
a ``--reference`` 16-bit base, or written back in the base's own scheme with ``--requantize``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from loratools.ops.merge.targets import MergeTarget

_CHECKPOINT = frozenset({"dtype", "max_shard_size", "device", "verify"})


class RequantizeTarget(MergeTarget):
    label = "a quantized base with --requantize"
    accepts = frozenset({"requantize", "reference"})
    why = "it keeps the base's files and dtypes, runs on the CPU, and --verify checks 16-bit merges only"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        return bool(options.requantize)

    @classmethod
    def merge(cls, base: Any, base_path: Path, adapters: Any, output: Any, options: Any) -> Any:
        from loratools.ops.merge.provenance import merge_provenance
        from loratools.ops.merge.quantized import check_quant_options, merge_requantized
        from loratools.ops.merge.summary import MergeSummary

        t0 = time.perf_counter()
        o = options
        check_quant_options(base_path, True, o.reference, o.into, o.dtype, o.max_shard_size, o.verify, o.device)

        def meta(reader: Any, w: list[float]) -> dict[str, str]:
            return merge_provenance(base, base_path, reader, adapters, w, "requantize", None, o.include, o.exclude)

        done = merge_requantized(
            base_path, adapters, output, meta, reference=o.reference, weights=o.weights, overwrite=o.overwrite,
            include=o.include, exclude=o.exclude, trust_tensors=o.trust_tensors, progress=o.progress,
            allow_other_base=o.allow_other_base,
        )  # fmt: skip
        return MergeSummary(output=Path(output), seconds=time.perf_counter() - t0, **done)


class QuantizedTarget(MergeTarget):
    """``--reference`` / ``--into`` (a quantized base without them merges like any checkpoint: the reader
    dequantizes each module, and the summary names the scheme)."""

    label = "a quantized base"
    accepts = _CHECKPOINT | {"reference", "into"}
    why = "--skip-module is for ONNX models"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        return options.reference is not None or options.into != "base"

    @classmethod
    def merge(cls, base: Any, base_path: Path, adapters: Any, output: Any, options: Any) -> Any:
        from loratools.ops.merge.checkpoint_merge import merge_checkpoint
        from loratools.ops.merge.quantized import check_quant_options
        from loratools.publishing.hub import resolve_path

        o = options
        check_quant_options(base_path, False, o.reference, o.into, o.dtype, o.max_shard_size, o.verify, o.device)
        if o.into == "reference":
            path = resolve_path(o.reference, "reference checkpoint")
            return merge_checkpoint(o.reference, path, adapters, output, o, quant_base=base_path)
        return merge_checkpoint(base, base_path, adapters, output, o, quant_base=base_path)
