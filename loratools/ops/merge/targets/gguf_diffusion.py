"""A GGUF diffusion checkpoint as ComfyUI-GGUF writes it (``general.architecture`` flux, wan, sd3, hyvid ...):
touched tensors rewritten in their own type where the gguf package encodes it (K/I-quants as F16), one file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratools.ops.merge.targets import MergeTarget


class GgufDiffusionTarget(MergeTarget):
    label = "a GGUF diffusion model"
    accepts = frozenset({"verify"})
    why = "it keeps each tensor's own type in one file on the CPU"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        from loratools.formats.adapter_io import gguf_base_kind

        return gguf_base_kind(base) == "diffusion"

    @classmethod
    def merge(cls, base: Any, base_path: Path, adapters: Any, output: Any, options: Any) -> Any:
        from loratools.ops.merge.gguf_diffusion import merge_gguf_diffusion

        return merge_gguf_diffusion(base, base_path, list(adapters), output, options)
