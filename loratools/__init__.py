"""loratools: read, validate, diff, resize, combine, convert, merge, export and push LoRA adapters.

The public API is imported lazily so that ``import loratools`` (and ``loratools --help``) stays fast and
does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    "Adapter": "loratools.model.adapter",
    "LoraModule": "loratools.model.adapter",
    "load_adapter": "loratools.formats.adapter_io",
    "save_adapter": "loratools.formats.adapter_io",
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


#: modules moved into layer packages (issue 18); the old paths import the new modules for one release
_MOVED = {
    "loratools.adapter": "loratools.model.adapter",
    "loratools.lowrank": "loratools.model.lowrank",
    "loratools.tied": "loratools.model.tied",
    "loratools.tokens": "loratools.model.tokens",
    "loratools.alora": "loratools.model.alora",
    "loratools.ambiguity": "loratools.model.ambiguity",
    "loratools.finite": "loratools.model.finite",
    "loratools.safetensors_file": "loratools.files.safetensors_file",
    "loratools.pickle_file": "loratools.files.pickle_file",
    "loratools.json_file": "loratools.files.json_file",
    "loratools.hub": "loratools.publishing.hub",
    "loratools.hub_select": "loratools.publishing.hub_select",
    "loratools.card": "loratools.publishing.card",
    "loratools.publish": "loratools.publishing.publish",
    "loratools.output_guard": "loratools.publishing.output_guard",
    "loratools.numeric_args": "loratools.args.numeric_args",
    "loratools.filters": "loratools.args.filters",
    "loratools.devices": "loratools.args.devices",
    "loratools.ldm_keymap": "loratools.checkpoint.ldm_keymap",
    "loratools.adapter_io": "loratools.formats.adapter_io",
    "loratools.formats.gguf_names": "loratools.formats.gguf.names",
    "loratools.formats.gguf_plan": "loratools.formats.gguf.plan",
    "loratools.formats.gguf_rewrites": "loratools.formats.gguf.rewrites",
    "loratools.formats.peft_config": "loratools.formats.peft.config",
    "loratools.formats.peft_families": "loratools.formats.peft.families",
    "loratools.formats.peft_pipeline": "loratools.formats.peft.pipeline",
    "loratools.formats.kohya_meta": "loratools.formats.kohya.meta",
    "loratools.formats.kohya_sgm": "loratools.formats.kohya.sgm",
    "loratools.formats.lycoris": "loratools.formats.kohya.lycoris",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import loratools.adapter`` still works: it is the module now at ``loratools.model.adapter``."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name in _MOVED else None

    _real: dict[str, Any] = {}

    def create_module(self, spec: Any) -> Any:
        warnings.warn(f"{spec.name} moved to {_MOVED[spec.name]}", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(_MOVED[spec.name])
        self._real[spec.name] = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self._real.pop(module.__spec__.name)  # the import set the alias's spec on it


sys.meta_path.append(_MovedModules())
