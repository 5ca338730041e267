"""loratools: read, validate, diff, resize, combine, convert, merge, export and push LoRA adapters.

The public API is imported lazily so that ``import loratools`` (and ``loratools --help``) stays fast and
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    "Adapter": "loratools.adapter",
    "LoraModule": "loratools.adapter",
    "load_adapter": "loratools.adapter_io",
    "save_adapter": "loratools.adapter_io",
    "open_checkpoint": "loratools.checkpoint.reader",
    "CheckpointReader": "loratools.checkpoint.reader",
    "info": "loratools.ops.info",
    "validate": "loratools.ops.validate",
    "scan_adapter": "loratools.ops.scan",
    "merge": "loratools.ops.merge",
    "verify": "loratools.ops.verify",
    "resize": "loratools.ops.resize",
    "rescale": "loratools.ops.rescale",
    "diff": "loratools.ops.diff",
    "combine": "loratools.ops.combine",
    "extract": "loratools.ops.extract",
    "spectrum": "loratools.ops.spectrum",
    "convert": "loratools.ops.convert",
    "push": "loratools.ops.push",
    "PushResult": "loratools.ops.push",
    "export_onnx": "loratools.onnx.export",
    "merge_onnx": "loratools.onnx.patch",
    "LoratoolsError": "loratools.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'loratools' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
