"""Adapter file formats: each converts disk <-> :class:`~loratools.model.adapter.Adapter`, no math.

A format is one module here (or a subpackage per ecosystem: ``peft/``, ``kohya/``, ``gguf/``) with a class
registered by :func:`register_format`; name its module in ``_BUILTIN`` so that detection sees it.
``adapter_io`` is the face of this layer: ``load_adapter`` / ``save_adapter``.

May import: ``loratools.errors``, ``files``, ``model``, ``families``, ``args``, ``publishing``. Never
``checkpoint`` (a base is seen only through the ``KeyResolver`` protocol), ``ops``, ``onnx`` or ``cli``.
"""

from __future__ import annotations

from loratools.formats.registry import AdapterFormat, detect_format, get_format, list_formats, register_format

_BUILTIN = (
    "mlx",
    "vllm_moe",  # before peft: a PEFT folder whose safetensors record says it holds per-expert modules
    "peft.format",
    "kohya.format",
    "diffusers",
    "onnx_adapter",
    "gguf.format",
    "dit.format",
)

__all__ = ["AdapterFormat", "detect_format", "get_format", "list_formats", "register_format"]
