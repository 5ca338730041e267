"""Safetensors checkpoints: a diffusers pipeline folder, a Stable Diffusion single file (LDM/SGM layout), any
other single file, and a Hugging Face model folder (sharded or not, safetensors or ``.bin``; a quantized one is
read dequantized). All four merge the same streaming way (:func:`~..checkpoint_merge.merge_checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratools.ops.merge.targets import MergeTarget

_FOLDER = frozenset({"dtype", "max_shard_size", "device", "verify", "expand_base"})


class _Checkpoint(MergeTarget):
    accepts = _FOLDER
    why = "--skip-module is for ONNX models, --requantize/--reference/--into for quantized bases"

    @classmethod
    def merge(cls, base: Any, base_path: Path, adapters: Any, output: Any, options: Any) -> Any:
        from loratools.formats.dit.bfl_control import expanding_base
        from loratools.ops.merge.checkpoint_merge import merge_checkpoint

        with expanding_base(options.expand_base) as widened:  # a control LoRA's wider img_in (ops/merge/widen.py)
            summary = merge_checkpoint(base, base_path, adapters, output, options)
        if options.expand_base:
            from loratools.ops.merge.widen import widen_notes

            summary.notes.extend(widen_notes(widened, base_path.is_file()))
        return summary


class PipelineTarget(_Checkpoint):
    label = "a diffusers pipeline"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        return base.is_dir() and (base / "model_index.json").is_file()


class _File(_Checkpoint):
    accepts = _FOLDER - {"max_shard_size"}
    why = "a single-file base is written as one file; --max-shard-size needs a model folder base"


class SdSingleFileTarget(_File):
    label = "a Stable Diffusion single file"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        from loratools.checkpoint.ldm_keymap import is_ldm
        from loratools.errors import LoratoolsError
        from loratools.files.safetensors_file import read_header

        if not (base.is_file() and base.suffix == ".safetensors"):
            return False
        try:  # a header it cannot read is reported by the merge itself
            return is_ldm(read_header(base)[0])
        except (LoratoolsError, OSError):
            return False


class SingleFileTarget(_File):
    label = "a single .safetensors file"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        return base.is_file()


class FolderTarget(_Checkpoint):
    label = "a model folder"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        return True
