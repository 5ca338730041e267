"""ONNX: export (merged) models, merge adapters straight into ONNX initializers, LoRA slots, runtime.

Everything here needs the ``onnx`` extra (onnx, onnxruntime, onnxscript, transformers), imported
lazily. Modules: :mod:`.export` (transformers + torch.onnx), :mod:`.patch` (merge into an exported
model), :mod:`.slots` (LoRA-input graphs for onnxruntime's multi-LoRA), :mod:`.runtime` (sessions,
providers, verification, timing), :mod:`.bench` (the latency table), :mod:`.graph` / :mod:`.store`
(weight lookup and external-data streaming), :mod:`.dropped` (the tensors an export left out, so modules on
them may be skipped), :mod:`.slot_map` (an adapter fitted to any graph's LoRA inputs: ours, Olive's,
onnxruntime-genai's), :mod:`.verify_merge` (merge-into-ONNX's options and --verify), :mod:`.tasks`.
"""

from __future__ import annotations

from typing import Any

#: opsets export-onnx writes: torch.onnx implements its ops from opset 18 (lower ones are a version
#: conversion that fails and silently keeps 18) up to torch.onnx's ONNX_MAX_OPSET (23 in torch 2.13)
MIN_OPSET, MAX_OPSET = 18, 23

_API = {
    "export_onnx": "export",
    "merge_onnx": "patch",
    "add_slots": "slots",
    "slot_tensors": "slots",
    "bench": "bench",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    import importlib

    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
