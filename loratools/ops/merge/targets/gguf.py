"""A GGUF model file: touched tensors rewritten in their own type (K/I-quants as F16), one file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratools.ops.merge.targets import MergeTarget


class GgufTarget(MergeTarget):
    label = "a GGUF model"
    accepts = frozenset({"verify"})
    why = "it keeps each tensor's own type in one file on the CPU"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        from loratools.ops.merge.gguf import is_gguf_base

        return is_gguf_base(base)

    @classmethod
    def merge(cls, base: Any, base_path: Path, adapters: Any, output: Any, options: Any) -> Any:
        from loratools.ops.merge.gguf import merge_gguf

        return merge_gguf(
            base_path, list(adapters), output, weights=options.weights, verify=options.verify,
            overwrite=options.overwrite, include=options.include, exclude=options.exclude,
            trust_tensors=options.trust_tensors, allow_other_base=options.allow_other_base,
        )  # fmt: skip

