"""Merge targets: one small class per base kind. Each says whether it takes a base, which options it accepts
(the refusal of the others is one message built from that list, :func:`~..options.refuse_unaccepted`) and how
it merges. ``target_for`` asks them in ``ORDER`` and the first that takes the base wins.

A new base kind is one module here with a :class:`MergeTarget` subclass and one line in ``ORDER``; copy
``onnx.py`` for a base with its own writer, or ``checkpoint.py``'s classes for a safetensors layout.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter
    from loratools.ops.merge.options import MergeOptions
    from loratools.ops.merge.summary import MergeSummary

#: module:class, asked in this order (the specific kinds before the plain folder, which takes anything left)
ORDER = (
    "onnx:OnnxTarget",
    "gguf_diffusion:GgufDiffusionTarget",
    "gguf:GgufTarget",
    "quantized:RequantizeTarget",
    "quantized:QuantizedTarget",
    "checkpoint:PipelineTarget",
    "checkpoint:SdSingleFileTarget",
    "checkpoint:SingleFileTarget",
    "checkpoint:FolderTarget",
)


class MergeTarget:
    """One base kind. Subclasses set the three class attributes and implement ``takes`` and ``merge``."""

    #: what the base is called in messages ("an ONNX model")
    label: ClassVar[str] = ""
    #: options it takes beyond those every kind takes (``options.ALWAYS``)
    accepts: ClassVar[frozenset[str]] = frozenset()
    #: why it takes no others (one clause, for the refusal)
    why: ClassVar[str] = ""

    @classmethod
    def takes(cls, base: Path, options: MergeOptions) -> bool:
        raise NotImplementedError

    @classmethod
    def merge(
        cls, base: str | Path, base_path: Path, adapters: Sequence[str | Path | Adapter], output: str | Path,
        options: MergeOptions,
    ) -> MergeSummary:  # fmt: skip
        raise NotImplementedError


def targets() -> list[type[MergeTarget]]:
    out = []
    for entry in ORDER:
        module, name = entry.split(":")
        out.append(getattr(importlib.import_module(f"{__name__}.{module}"), name))
    return out


def target_for(base: Path, options: MergeOptions) -> type[MergeTarget]:
    """The first target in ``ORDER`` that takes ``base`` (the plain folder target takes whatever is left)."""
    for target in targets():
        if target.takes(base, options):
            return target
    raise AssertionError("the folder target takes every base")  # pragma: no cover


__all__ = ["ORDER", "MergeTarget", "target_for", "targets"]
