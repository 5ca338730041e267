"""Which checkpoint tensors an export left out of its graph, and the adapter modules that may skip them.

An export keeps only what its outputs depend on: a BertModel exported for ``last_hidden_state`` has no
``pooler.dense`` weights, yet a PEFT adapter whose ``target_modules`` say ``dense`` adapts the pooler too.
``export-onnx`` records the checkpoint tensors its graph does not hold (model metadata key
``loratools.dropped``, and ``dropped`` in loratools_onnx.json), so merging into the graph and adding LoRA
slots can skip a module whose weight is in that record: the record proves the module cannot change the
outputs. A graph without the record (a foreign export) proves nothing; its missing modules stay an error
unless the user names them (``--skip-module``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

META_KEY = "loratools.dropped"
MANIFEST_KEY = "dropped"


def dropped_tensors(model: onnx.ModelProto, keys: Iterable[str], aliases: dict[str, list[str]]) -> list[str]:
    """Parameters ``keys`` (the exported model's, named as the graph names them) that the graph holds
    neither by name nor through a tied alias.

    ``aliases`` maps a parameter to every name tied to it (embeddings shared with an LM head): a tied
    name the checkpoint stores twice is held by the graph when any name of its group is.
    """
    from loratools.onnx.graph import GraphIndex

    held = set(GraphIndex(model).parameters)
    group = {name: names for names in aliases.values() for name in names}
    return sorted(k for k in keys if k not in held and not held.intersection(group.get(k, ())))


def record_dropped(model: onnx.ModelProto, names: list[str]) -> None:
    """Store ``names`` in the model's metadata (kept through merges into the graph)."""
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            prop.value = json.dumps(names)
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(names)


def read_dropped(model: onnx.ModelProto, model_file: Path | None = None) -> set[str] | None:
    """The recorded dropped tensors, or None when the graph carries no record (not our export)."""
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            try:
                names = json.loads(prop.value)
            except ValueError:
                return None
            return {str(n) for n in names} if isinstance(names, list) else None
    manifest = model_file.parent / "loratools_onnx.json" if model_file is not None else None
    if manifest is not None and manifest.is_file():
        try:
            names = json.loads(manifest.read_text(encoding="utf-8")).get(MANIFEST_KEY)
        except (ValueError, AttributeError):
            return None
        return {str(n) for n in names} if isinstance(names, list) else None
    return None


def weight_of(module: str, tensors: Iterable[str]) -> str | None:
    """The tensor among ``tensors`` that holds ``module``'s weight (exact path or the base's prefix variants)."""
    from loratools.checkpoint.keymap import KeyMatcher

    return KeyMatcher(list(tensors)).tensor_key(module, "weight")


def skip_reason(module: str, dropped: set[str] | None, skip: Iterable[str]) -> str | None:
    """Why ``module`` (absent from the graph) may be left out, or None when it may not."""
    if module in set(skip):
        return "named with --skip-module"
    if dropped:
        tensor = weight_of(module, dropped)
        if tensor is not None:
            return f"the export left {tensor} out of the graph, so it cannot change the outputs"
    return None
