"""An adapter fitted to a graph's LoRA inputs: ours, Olive's, onnxruntime-genai model-builder models.

A slot graph takes each module's LoRA factors as two inputs, ``<module>.lora_A<suffix>`` [in, r] and
``<module>.lora_B<suffix>`` [r, out] (B pre-scaled); ``<module>`` is whatever module path the graph's
maker used. Ours and Olive's use the checkpoint's (``model.layers.0.self_attn.q_proj``); the
onnxruntime-genai builder uses its own (``model.layers.0.attn.q_proj``). Names, sizes, dtype and rank are
read from the graph's inputs, never built from a convention:

- a module maps to the slot of the same path, else to the one slot with the same layer numbers and the
  same last name (``q_proj`` in layer 0), and the slot's in/out sizes must equal the module's;
- a graph with a static rank takes exactly that rank: a smaller adapter rank is zero-padded up to it
  (exact: the padded columns of A meet zero rows of B), a larger one is refused with the way out
  (``loratools resize --rank``); a rank symbol shared by every slot gets the adapter's largest rank;
- a slot the adapter does not cover keeps its default when it has one, else gets zeros of its rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import UnsupportedError, ValidationError, name_list

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from loratools.model.adapter import Adapter

_A, _B = ".lora_A", ".lora_B"


@dataclass(frozen=True)
class SlotInput:
    """One module's pair of LoRA inputs in a graph."""

    module: str  # the module path as the graph names it
    a_name: str
    b_name: str
    in_features: int
    out_features: int
    rank: int | str | None  # static rank, a symbolic dimension's name, or None (unnamed dynamic)
    dtype: str  # numpy dtype name
    has_default: bool  # an initializer of the same name feeds the input when no adapter does


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


def graph_slots(model: onnx.ModelProto) -> dict[str, SlotInput]:
    """Graph module path -> its LoRA inputs (pairs ``<module>.lora_A<suffix>`` / ``<module>.lora_B<suffix>``)."""
    from onnx import helper

    inputs = {i.name: i for i in model.graph.input}
    defaults = {t.name for t in model.graph.initializer}
    found: dict[str, SlotInput] = {}
    for name, value in inputs.items():
        if _A not in name:
            continue
        module, suffix = name.rsplit(_A, 1)
        b = inputs.get(module + _B + suffix)
        if b is None:
            continue
        a_dims = list(value.type.tensor_type.shape.dim)
        b_dims = list(b.type.tensor_type.shape.dim)
        if len(a_dims) != 2 or len(b_dims) != 2:
            continue
        found[module] = SlotInput(
            module, name, b.name, _int(a_dims[0]), _int(b_dims[1]), _dim(a_dims[1]),
            str(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)),
            name in defaults and b.name in defaults,
        )  # fmt: skip
    return found


def _int(dim: onnx.TensorShapeProto.Dimension) -> int:
    value = _dim(dim)
    return value if isinstance(value, int) else -1


def _key(path: str) -> tuple[tuple[int, ...], str]:
    """Layer numbers and last name: ``model.layers.0.self_attn.q_proj`` -> ((0,), "q_proj")."""
    parts = path.split(".")
    return tuple(int(p) for p in parts if re.fullmatch(r"\d+", p)), parts[-1]


def map_modules(adapter: Adapter, slots: dict[str, SlotInput], where: str) -> dict[str, SlotInput]:
    """Adapter module -> the graph slot it feeds; ValidationError for a module no slot (or several) fits."""
    by_key: dict[tuple[tuple[int, ...], str], list[SlotInput]] = {}
    for slot in slots.values():
        by_key.setdefault(_key(slot.module), []).append(slot)
    mapping, outside = {}, []
    for name in adapter.modules:
        candidates = [slots[name]] if name in slots else by_key.get(_key(name), [])
        if len(candidates) != 1:
            outside.append(name)
            continue
        mapping[name] = candidates[0]
    if outside:
        raise ValidationError(
            f"{where}: the slot graph has no LoRA slot for {len(outside)} module(s): " + name_list(outside, 3),
            hint="export a graph for this adapter: `loratools export-onnx MODEL --lora-slots ADAPTER -o OUT`",
        )
    taken: dict[str, str] = {}
    for name, slot in mapping.items():
        module = adapter.modules[name]
        if taken.setdefault(slot.module, name) != name:
            raise ValidationError(f"{where}: modules {taken[slot.module]} and {name} both map to slot {slot.module}")
        if (slot.in_features, slot.out_features) != (module.in_features, module.out_features):
            raise ValidationError(
                f"{where}: slot {slot.module} is {slot.in_features}->{slot.out_features}, "
                f"the adapter's module {name} is {module.in_features}->{module.out_features}"
            )
    return mapping


def slot_feeds(adapter: Adapter, model: str | Path, dtype: str | None = None) -> dict[str, np.ndarray]:
    """The adapter as tensors named after ``model``'s LoRA inputs, padded to the graph's rank (see module doc).

    ``dtype`` is a numpy dtype name; by default the graph's. Raises ValidationError (names, sizes,
    dtype), UnsupportedError (a rank above the graph's) before anything is written.
    """
    import numpy as np

    from loratools.onnx.slots import slot_tensors
    from loratools.onnx.store import load_graph, model_path

    path = model_path(model)
    graph = load_graph(path)
    slots = graph_slots(graph)
    if not slots:
        raise ValidationError(
            f"{path}: the model has no LoRA inputs (pairs of inputs named <module>.lora_A... / <module>.lora_B...)",
            hint="export it with `loratools export-onnx MODEL --lora-slots ADAPTER -o OUT_DIR`",
        )
    skipped = dropped_modules(adapter, path, slots)
    if skipped:  # modules whose weight our export left out of the graph have no slot and need none
        adapter = adapter.select(exclude="^(" + "|".join(re.escape(n) for n in skipped) + ")$")
    mapping = map_modules(adapter, slots, str(path))
    graph_dtype = next(iter(slots.values())).dtype
    np_dtype = dtype or graph_dtype
    for slot in mapping.values():
        if slot.dtype != np_dtype:
            raise ValidationError(
                f"{path}: slot {slot.module} takes {slot.dtype}, the adapter would be written as {np_dtype}",
                hint=f"pass --dtype {'fp16' if slot.dtype == 'float16' else 'fp32'}",
            )
    ours = slot_tensors(adapter, np_dtype, str(adapter.meta.get("source", "adapter")))
    symbols = {s.rank for s in slots.values()}
    shared = len(symbols) == 1 and isinstance(next(iter(symbols)), str)
    widest = max((m.rank for m in adapter.modules.values()), default=0)
    feeds: dict[str, np.ndarray] = {}
    for name, slot in mapping.items():
        a, b = ours[name + ".lora_A.weight"], ours[name + ".lora_B.weight"]
        rank = a.shape[1]
        target = slot.rank if isinstance(slot.rank, int) else (widest if shared else rank)
        if rank > target:
            source = adapter.meta.get("source") or "ADAPTER"
            raise UnsupportedError(
                f"{path}: module {name} has rank {rank}; the graph's LoRA inputs ({slot.module}) take rank {target}",
                hint=f"lower the rank first: loratools resize {source} --rank {target} -o SMALLER, then convert that",
            )
        feeds[slot.a_name] = np.pad(a, ((0, 0), (0, target - rank)))
        feeds[slot.b_name] = np.pad(b, ((0, target - rank), (0, 0)))
    for slot in slots.values():  # a required input the adapter does not cover: a zero update of its rank
        if slot.a_name not in feeds and not slot.has_default and isinstance(slot.rank, int):
            feeds[slot.a_name] = np.zeros((slot.in_features, slot.rank), dtype=np_dtype)
            feeds[slot.b_name] = np.zeros((slot.rank, slot.out_features), dtype=np_dtype)
    return feeds


def dropped_modules(adapter: Adapter, model: str | Path, slots: dict[str, SlotInput] | None = None) -> dict[str, str]:
    """Modules without a slot whose weight ``model``'s export recorded as dropped: module -> why they need none."""
    from loratools.onnx.dropped import read_dropped, skip_reason
    from loratools.onnx.store import load_graph, model_path

    path = model_path(model)
    graph = load_graph(path)
    dropped = read_dropped(graph, path)
    if not dropped:
        return {}
    slots = graph_slots(graph) if slots is None else slots
    found = {n: skip_reason(n, dropped, ()) for n in adapter.modules if n not in slots}
    return {n: r for n, r in found.items() if r is not None}
