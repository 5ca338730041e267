"""Projections an adapter holds split where the Hugging Face base holds them fused, and the reverse (issue 22 §4).

Phi-3 keeps ``self_attn.qkv_proj`` (Q, K, V stacked by rows, as ``Phi3Attention`` slices them) and
``mlp.gate_up_proj`` (gate rows first: ``Phi3MLP`` chunks gate, then up); a Llama-layout copy of it has
``q_proj/k_proj/v_proj`` and ``gate_proj/up_proj``. An adapter trained on one layout merges into the other
exactly, with the math :mod:`loratools.model.fused` holds for the GGUF writer too:

- **fuse** (parts into a fused base tensor): A's stacked, B block-diagonal (parts sharing one A keep it), each
  part's scale folded into its block; a part the adapter lacks is zero rows;
- **split** (a fused module into the base's part tensors): A shared, each part takes its rows of B.

The part widths come from the base: the part tensors' rows for a split; for a fuse the fused tensor's rows,
less the parts the adapter has (K and V are equally wide, gate and up are halves). A module that is not a plain
linear LoRA (DoRA, LoHa ...) or widths that do not add up are refused in one line.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loratools.errors import ShapeError, UnsupportedError

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter

#: fused leaf -> (parent module, its parts in row order)
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
}
_FUSED_OF = {part: fused for fused, (_, parts) in GROUPS.items() for part in parts}
_PATH = re.compile(r"^(?P<stem>.+\.(?:self_attn|mlp))\.(?P<leaf>\w+)$")


def lower_fused(adapter: Adapter, reader: Any, read: Any = None) -> Adapter:
    """``adapter`` with its projections in the base's layout (see the module docstring); as it is when every
    module has its own tensor. ``read(t)``: the data of a factor left in its file (a merge's lean load)."""
    keys = set(reader.keys())
    modules = dict(adapter.modules)
    split_here, fuse_here = [], {}
    for name in modules:
        match = _PATH.match(name)
        if match is None or f"{name}.weight" in keys:
            continue
        stem, leaf = match["stem"], match["leaf"]
        if leaf in GROUPS and GROUPS[leaf][0] == stem.rsplit(".", 1)[1]:
            if all(f"{stem}.{p}.weight" in keys for p in GROUPS[leaf][1]):
                split_here.append((name, stem, leaf))
        elif leaf in _FUSED_OF and f"{stem}.{_FUSED_OF[leaf]}.weight" in keys:
            fuse_here.setdefault((stem, _FUSED_OF[leaf]), {})[leaf] = name
    if not split_here and not fuse_here:
        return adapter
    where = str(adapter.meta.get("source") or "adapter")
    for name, stem, leaf in split_here:
        _split(modules, name, stem, leaf, reader, where, read)
    for (stem, leaf), found in sorted(fuse_here.items()):
        _fuse(modules, stem, leaf, found, reader, where, read)
    return replace(adapter, modules=modules, meta=dict(adapter.meta))


def _plain(m: Any, name: str, where: str, read: Any) -> Any:
    from loratools.model.adapter import LoraModule

    if type(m) is not LoraModule:
        raise UnsupportedError(
            f"{where}: module {name} is a {getattr(m, 'kind', type(m).__name__)} module; only plain linear LoRA "
            "splits or fuses exactly between the base's fused and split projections"
        )
    return m if read is None else replace(m, down=read(m.down), up=read(m.up))


def _split(modules: dict, name: str, stem: str, leaf: str, reader: Any, where: str, read: Any) -> None:
    from loratools.model import fused

    parts = GROUPS[leaf][1]
    rows = [int(reader.info(f"{stem}.{p}.weight").shape[0]) for p in parts]
    m = _plain(modules[name], name, where, read)
    if sum(rows) != m.out_features:
        raise ShapeError(
            f"{where}: module {name} has {m.out_features} output rows; the base's {', '.join(parts)} under {stem} "
            f"hold {' + '.join(map(str, rows))} = {sum(rows)}"
        )
    clash = [f"{stem}.{p}" for p in parts if f"{stem}.{p}" in modules]
    if clash:
        raise UnsupportedError(f"{where}: the adapter holds both {name} and {', '.join(clash)}; merge them apart")
    del modules[name]
    for part, piece in zip(parts, fused.split(m, rows, f"{where}: module {name}"), strict=True):
        if piece is not None:
            modules[f"{stem}.{part}"] = piece


def _fuse(modules: dict, stem: str, leaf: str, found: dict[str, str], reader: Any, where: str, read: Any) -> None:
    from loratools.model import fused

    parts = GROUPS[leaf][1]
    target = f"{stem}.{leaf}"
    if target in modules:
        raise UnsupportedError(f"{where}: the adapter holds both {target} and {', '.join(sorted(found.values()))}")
    mods = {p: _plain(modules[n], n, where, read) for p, n in found.items()}
    total = int(reader.info(f"{target}.weight").shape[0])
    widths = _widths(parts, {p: m.out_features for p, m in mods.items()}, total)
    if widths is None or sum(widths) != total:
        have = ", ".join(f"{found[p]} {m.out_features}" for p, m in mods.items())
        raise ShapeError(f"{where}: {have} output rows do not fit the base's {target}.weight ({total} rows)")
    new = fused.fuse([mods.get(p) for p in parts], widths, f"{where}: {', '.join(sorted(found.values()))}")
    for n in found.values():
        del modules[n]
    modules[target] = new


def _widths(parts: tuple[str, ...], have: dict[str, int], total: int) -> list[int] | None:
    """Each part's rows of the fused tensor: the adapter's own, the rest from ``total`` (K = V, gate = up)."""
    if len(parts) == 2:  # gate, up: halves
        return [total // 2, total // 2] if total % 2 == 0 and all(v == total // 2 for v in have.values()) else None
    q, k, v = (have.get(p) for p in parts)
    kv = k or v or (None if q is None or (total - q) % 2 else (total - q) // 2)
    if kv is None or (k is not None and v is not None and k != v):
        return None
    return [q if q is not None else total - 2 * kv, kv, kv]
