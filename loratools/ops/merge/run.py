"""Streaming merge of LoRA adapters into a base: W' = W + Σ w_i·scale_i·B_i·A_i.

``merge`` resolves the base, picks the merge target of its kind (:mod:`.targets`: ONNX, GGUF, quantized,
pipeline, SD single file, single file, folder), refuses the options that kind does not take in one message,
and hands over. Data flows one way inside every target: reader -> adapters resolved against the base ->
plan (validated in full before anything is written) -> writer -> atomic publish.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import UsageError
from loratools.ops.merge.options import MergeOptions, refuse_unaccepted

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter
    from loratools.ops.merge.summary import MergeSummary


def merge(
    base: str | Path,
    adapters: Sequence[str | Path | Adapter],
    output: str | Path,
    options: MergeOptions | None = None,
    **kwargs: Any,
) -> MergeSummary:
    """Merge ``adapters`` into ``base`` and publish the result at ``output`` atomically.

    Options come as a :class:`~loratools.ops.merge.options.MergeOptions` or as its fields by keyword
    (``merge(base, adapters, out, weights=[1, -0.5], dtype="bf16", verify=True)``); see that class for each.
    A quantized base (bitsandbytes, FP8, GPTQ, AWQ) is dequantized: deq(Wq) + ΔW in its compute dtype
    (:mod:`.quantized` for ``requantize``/``reference``/``into``). An ONNX base goes to
    :func:`loratools.onnx.patch.merge_onnx`, a GGUF base to :func:`.gguf.merge_gguf`. Options a base kind has no
    use for are refused, never ignored. An activated LoRA (aLoRA) is refused unless ``allow_alora``: merged,
    it acts on every token.
    """
    from loratools.model.alora import refuse_merge
    from loratools.ops.merge.targets import target_for
    from loratools.publishing.hub import resolve_path

    if options is not None and kwargs:
        raise UsageError("merge() takes a MergeOptions or keyword options, not both")
    opts = options if options is not None else MergeOptions.of(kwargs)
    base_path = resolve_path(base, "base checkpoint")
    refuse_merge(adapters, opts.allow_alora)
    if not adapters:
        raise UsageError("merge needs at least one adapter")
    target = target_for(base_path, opts)
    refuse_unaccepted(opts, target.label, target.accepts, target.why)
    return target.merge(base, base_path, adapters, output, opts)
