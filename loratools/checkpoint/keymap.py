"""Module path -> base tensor key matching.

An adapter names modules by the path in the model it was trained on (``model.layers.0.self_attn.q_proj``);
a base checkpoint names tensors as its ``save_pretrained`` wrote them, which may add or drop wrapper
prefixes (``bert.``, ``model.``, the Hub's ``text_model.``). Matching tries the exact ``<module>.weight``
first, then compares names with wrapper components removed; a match must be unique. A Stable Diffusion
single file in the original (LDM) layout also answers to its diffusers pipeline names
(:mod:`loratools.checkpoint.ldm_keymap`), and some of its modules are a third of a fused tensor
(:class:`WeightTargets`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter


class Named(Protocol):
    """What key matching needs of a base: its tensor names and their infos (a ``CheckpointReader``; not
    imported here, since the reader itself matches keys through this module)."""

    def keys(self) -> list[str]: ...

    def info(self, key: str) -> Any: ...  # has .shape


#: path components that wrap a model without changing what a module is
WRAPPERS = frozenset({"model", "base_model", "text_model", "bert", "roberta", "transformer", "language_model"})


def _strip(path: str) -> str:
    return ".".join(p for p in path.split(".") if p not in WRAPPERS)


class KeyMatcher:
    """Finds the base tensor for module paths; build once per base."""

    def __init__(self, keys: list[str]) -> None:
        from loratools.checkpoint.ldm_keymap import ldm_layout

        self.keys = set(keys)
        self._by_stripped: dict[str, list[str]] = {}
        for k in keys:
            self._by_stripped.setdefault(_strip(k), []).append(k)
        self.ldm = ldm_layout(keys)

    def tensor_key(self, name: str, suffix: str = "weight") -> str | None:
        """The base key for tensor ``suffix`` of module ``name``, or None when absent or ambiguous."""
        exact = f"{name}.{suffix}"
        if exact in self.keys:
            return exact
        if self.ldm is not None and name in self.ldm.aliases:
            aliased = f"{self.ldm.aliases[name]}.{suffix}"
            return aliased if aliased in self.keys else None
        found = self._by_stripped.get(_strip(exact), [])
        return found[0] if len(found) == 1 else None

    def module(self, name: str) -> str | None:
        """The base's own module path for an adapter module path (its weight key minus ``.weight``)."""
        if self.ldm is not None and (name in self.ldm.aliases or name in self.ldm.fused):
            return name  # a pipeline name the file answers to (WeightTargets finds its tensor and rows)
        key = self.tensor_key(name)
        return key[: -len(".weight")] if key else None


def same_matrix(want: tuple[int, ...], have: tuple[int, ...]) -> bool:
    """Equal shapes, or a linear weight (out, in) and a 1×1 conv (out, in, 1, 1): the same matrix stored two
    ways (sd-scripts' SD2 LoRAs hold the original UNet's linear proj_in/proj_out as 1×1 convs)."""
    if want == have:
        return True
    matrix = [s for s in (want, have) if len(s) == 2]
    conv1x1 = [s for s in (want, have) if len(s) == 4 and s[2:] == (1, 1)]
    return len(matrix) == 1 and len(conv1x1) == 1 and matrix[0] == conv1x1[0][:2]


class WeightTargets:
    """Module path -> ``(tensor key, rows)``: the tensor a module's update goes into (an LDM file's own for a
    pipeline name), and for a fused part (q/k/v of an LDM file's OpenCLIP encoder, a third of its
    ``attn.in_proj_weight``) the ``(start, stop)`` of its rows, else None."""

    def __init__(self, reader: Named) -> None:
        from loratools.checkpoint.ldm_keymap import is_ldm, ldm_layout

        keys = reader.keys()
        self.reader = reader
        self.keys = set(keys)
        self.ldm = ldm_layout(keys) if is_ldm(keys) else None

    def __call__(self, module: str) -> tuple[str, tuple[int, int] | None]:
        key = f"{module}.weight"
        if key in self.keys or self.ldm is None:
            return key, None
        path = self.ldm.aliases.get(module, module)
        part = self.ldm.fused.get(path)
        if part is None:
            return f"{path}.weight", None
        step = int(self.reader.info(part.key).shape[0]) // part.parts
        return part.key, (part.index * step, (part.index + 1) * step)


def resolve_modules(names: list[str], reader: Named) -> tuple[dict[str, str], list[str]]:
    """Map module paths to the base's module paths; returns ``(mapping, unmatched)``."""
    matcher = KeyMatcher(reader.keys())
    mapping, unmatched = {}, []
    for n in names:
        m = matcher.module(n)
        if m is None:
            unmatched.append(n)
        else:
            mapping[n] = m
    return mapping, unmatched


def normalize_adapter(adapter: Adapter, reader: Named) -> Adapter:
    """A copy whose module and replacement keys use the base's own names (unmatched ones unchanged)."""
    from loratools.checkpoint.expert_keymap import ExpertTargets, where

    matcher = KeyMatcher(reader.keys())
    experts = ExpertTargets(reader, where(adapter))
    modules, unresolved = {}, []
    for name, mod in adapter.modules.items():
        if hasattr(mod, "num_experts"):  # an expert slice: stays keyed by its parameter (expert_keymap.py)
            modules[name] = mod
            if not experts.resolves(mod):
                unresolved.append(name)
            continue
        found = matcher.module(name) or experts.plain(name)
        modules[found or name] = mod
        if found is None:
            unresolved.append(name)
    replacements = {}
    for key, tensor in adapter.replacements.items():
        mod, _, suffix = key.rpartition(".")
        replacements[matcher.tensor_key(mod, suffix) or key] = tensor
    meta = dict(adapter.meta)
    meta["unresolved"] = unresolved
    if getattr(reader, "kind", None) == "pipeline":  # names now carry the component: PEFT writes one folder each
        meta["pipeline"] = True
    return replace(adapter, modules=modules, replacements=replacements, meta=meta)
