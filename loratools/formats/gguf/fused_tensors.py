"""Adapters whose projections are split where the GGUF base's tensor is fused, and the reverse.

llama.cpp's Phi-3 keeps Hugging Face's fused weights (``Phi3MiniModel`` in ``convert_hf_to_gguf.py`` renames
only): ``qkv_proj`` -> ``blk.N.attn_qkv`` (Q, K, V stacked by rows; the graph takes views at 0, n_embd and
n_embd + n_embd_gqa) and ``gate_up_proj`` -> ``blk.N.ffn_up`` (gate rows first: the graph's fused SwiGLU
applies SiLU to the first half). A Llama-family base is converted to ``attn_q/attn_k/attn_v`` and
``ffn_gate/ffn_up``. So an adapter trained on ``q_proj/k_proj/v_proj`` (``gate_proj/up_proj``), a Llama-fied
Phi-3's, meets a base with one tensor, and a Phi-3 adapter meets a Llama-fied Phi-3's GGUF with three.

Both rewrites are exact (:mod:`loratools.model.fused`), each part's scale folded into its B first:
- **fuse**: A's stacked, B block-diagonal (rank = the sum of the ranks; parts sharing one A keep it);
  a part the adapter lacks is zero rows;
- **split**: A shared, each part takes its rows of B, then the part's own converter rewrite (Llama's Q/K
  row permutation per head) as for any B.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.errors import ShapeError
from loratools.model import fused
from loratools.model.adapter import LoraModule

if TYPE_CHECKING:
    import torch

    from loratools.formats.gguf.names import GgufBase


@dataclass(frozen=True)
class Group:
    """One fused projection: the module holding it (``parent``), its fused leaf and its parts in row order."""

    parent: str
    fused: str
    parts: tuple[str, ...]


QKV = Group("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj"))
GATE_UP = Group("mlp", "gate_up_proj", ("gate_proj", "up_proj"))
GROUPS = (QKV, GATE_UP)
_PATH = re.compile(r"^(?P<stem>.*\.)(?P<parent>self_attn|mlp)\.(?P<leaf>\w+)$")


@dataclass
class Rewritten:
    """One base tensor's factors made from other modules: B in Hugging Face row order, scale folded (fp32)."""

    tensor: str
    module: str
    down: torch.Tensor
    up: torch.Tensor


@dataclass
class Regrouped:
    rewritten: list[Rewritten]
    #: adapter modules the rewritten factors stand for (the plan skips them)
    consumed: set[str]
    #: (module, message) of a group whose widths do not fit the base's heads
    problems: list[tuple[str, str]]


def _plain(m: object) -> bool:
    return (
        isinstance(m, LoraModule)
        and m.kind == "linear"
        and m.magnitude is None
        and m.bias is None
        and not m.fan_in_fan_out
    )


def _folded(m: LoraModule) -> LoraModule:
    """``m`` with its scale in B (fp32) and scale 1, so a split or fuse moves no scale around."""
    up, down = m.factors()
    return LoraModule(down=down, up=up * m.scale, alpha=float(m.rank))


def base_fused(base: GgufBase, group: Group, stem: str) -> bool | None:
    """True when the base's GGUF holds ``group`` of layer ``stem`` as one tensor, False as its parts, None
    when neither (or the architecture names neither)."""
    one = base.gguf_name(f"{stem}{group.parent}.{group.fused}")
    parts = [base.gguf_name(f"{stem}{group.parent}.{p}") for p in group.parts]
    if base.tensors is not None:
        if one in base.tensors and not any(p in base.tensors for p in parts if p != one):
            return True
        return False if all(p in base.tensors for p in parts) else None
    fused_arch = base.spec.fused_qkv if group is QKV else base.spec.fused_gate_up
    if fused_arch:
        return True if one else None
    return False if all(parts) and len(set(parts)) == len(parts) else None


def _part_rows(base: GgufBase, group: Group, widths: dict[str, int]) -> list[int]:
    """Row counts of ``group``'s parts from those the adapter has (``widths``: part -> B rows)."""
    if group is GATE_UP:
        if len(set(widths.values())) != 1:
            raise ShapeError(f"gate and up projections of different widths ({widths})")
        return [next(iter(widths.values()))] * 2
    heads = {"q_proj": base.n_head, "k_proj": base.n_head_kv, "v_proj": base.n_head_kv}
    dims = set()
    for part, rows in widths.items():
        if heads[part] <= 0 or rows % heads[part]:
            raise ShapeError(f"{part}'s {rows} rows do not split into {heads[part]} heads")
        dims.add(rows // heads[part])
    if len(dims) != 1:
        raise ShapeError(f"Q/K/V widths {widths} give different head sizes")
    dim = dims.pop()
    return [heads[p] * dim for p in group.parts]


def _split_rows(base: GgufBase, group: Group, rows: int) -> list[int]:
    if group is GATE_UP:
        if rows % 2:
            raise ShapeError(f"{rows} rows of gate_up_proj do not halve into gate and up")
        return [rows // 2] * 2
    heads = base.n_head + 2 * base.n_head_kv
    if base.n_head <= 0 or rows % heads:
        raise ShapeError(f"{rows} rows of qkv_proj do not split into {base.n_head} + 2 x {base.n_head_kv} heads")
    dim = rows // heads
    return [base.n_head * dim, base.n_head_kv * dim, base.n_head_kv * dim]


def regroup(modules: dict[str, object], base: GgufBase) -> Regrouped:
    """The factors of every fused or split projection of ``modules`` for ``base`` (see the module doc)."""
    out = Regrouped([], set(), [])
    layers: dict[tuple[str, Group], dict[str, str]] = {}
    for name, m in modules.items():
        match = _PATH.match(name)
        if match is None or not _plain(m):
            continue
        for group in GROUPS:
            leaf = match["leaf"]
            if match["parent"] == group.parent and (leaf == group.fused or leaf in group.parts):
                layers.setdefault((match["stem"], group), {})[leaf] = name
    for (stem, group), found in layers.items():
        fused_base = base_fused(base, group, stem)
        try:
            if fused_base is True and any(p in found for p in group.parts):
                _fuse(out, modules, base, group, stem, {p: found[p] for p in group.parts if p in found})
            elif fused_base is False and group.fused in found:
                _split(out, modules, base, group, stem, found[group.fused])
        except ShapeError as exc:
            names = sorted(found.values())
            out.problems.append((names[0], f"{', '.join(names)}: {exc.message}"))
            out.consumed.update(names)  # refused here, not written to a tensor of the other layout
    return out


def _fuse(out: Regrouped, modules: dict, base: GgufBase, group: Group, stem: str, found: dict[str, str]) -> None:
    rows = _part_rows(base, group, {p: int(modules[n].out_features) for p, n in found.items()})
    parts = [_folded(modules[found[p]]) if p in found else None for p in group.parts]
    where = f"{stem}{group.parent}.{group.fused}"
    m = fused.fuse(parts, rows, where)
    tensor = base.gguf_name(where)
    out.rewritten.append(Rewritten(str(tensor), " + ".join(found.values()), m.down, m.up))
    out.consumed.update(found.values())


def _split(out: Regrouped, modules: dict, base: GgufBase, group: Group, stem: str, name: str) -> None:
    m = modules[name]
    rows = _split_rows(base, group, int(m.out_features))
    for part, piece in zip(group.parts, fused.split(_folded(m), rows, name), strict=True):
        if piece is not None:  # rows of B all zero: the part is unchanged
            tensor = base.gguf_name(f"{stem}{group.parent}.{part}")
            out.rewritten.append(Rewritten(str(tensor), f"{name}[{part}]", piece.down, piece.up))
    out.consumed.add(name)
