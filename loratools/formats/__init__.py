"""Adapter file formats: each converts disk <-> :class:`~loratools.adapter.Adapter`, no math.

A format is one module here with a class registered by :func:`register_format`; import it in
``_BUILTIN`` so that detection sees it.
"""

from __future__ import annotations

from .registry import AdapterFormat, detect_format, get_format, list_formats, register_format

_BUILTIN = ("peft", "kohya", "diffusers", "onnx_adapter", "gguf")

__all__ = ["AdapterFormat", "detect_format", "get_format", "list_formats", "register_format"]
