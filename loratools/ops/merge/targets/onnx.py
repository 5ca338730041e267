"""An ONNX export (``model.onnx`` or a folder holding one): adapters patched into its initializers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratools.ops.merge.targets import MergeTarget


class OnnxTarget(MergeTarget):
    label = "an ONNX model"
    accepts = frozenset({"verify", "skip_modules"})
    why = "it keeps every weight's stored dtype, writes one model.onnx.data file and computes on the CPU"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        return base.suffix == ".onnx" or (base.is_dir() and (base / "model.onnx").is_file())

    @classmethod
    def merge(cls, base: Any, base_path: Path, adapters: Any, output: Any, options: Any) -> Any:
        from loratools.onnx.patch import merge_onnx

        # a named .onnx file stays the user's choice (its folder may hold several graphs)
        return merge_onnx(
            base_path, list(adapters), output, weights=options.weights, overwrite=options.overwrite,
            trust_tensors=options.trust_tensors, include=options.include, exclude=options.exclude,
            skip_modules=options.skip_modules, verify=options.verify, allow_other_base=options.allow_other_base,
        )  # fmt: skip
