"""Per-expert modules <-> expert slices of the fused parameters, exactly.

A per-expert LoRA (what PEFT wrote on transformers 4, and what vLLM and SGLang load for most MoE models)
adapts ``<layer>.mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` (Mixtral:
``<layer>.block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``) as plain linears. The fused parameters hold
``gate_up_proj[e]`` = gate rows then up rows (transformers 5's ``Concatenate(dim=1)``) and ``down_proj[e]``.

- :func:`split_experts`: a ``gate_up_proj[e]`` slice becomes a gate and an up module sharing its A, with B's
  first and second half of rows; ``down_proj[e]`` becomes ``down_proj`` (``w2``) as it is.
- :func:`fuse_experts`: the inverse. Gate and up with the same A and scale fuse back to one slice of that rank
  (so split then fuse is the identity); otherwise A is stacked and B block-diagonal (rank r_gate + r_up, the
  scales folded into B), exact either way. A part missing on one side gets zero rows.

Only experts stored ``(out, in)`` split this way: gpt-oss's ``(in, out)`` experts interleave gate and up.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loratools.errors import ShapeError, UnsupportedError

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter, LoraModule

#: naming scheme -> (container on disk, fused parameter -> its parts in row order)
SCHEMES: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "default": ("mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
    "mixtral": ("block_sparse_moe", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),
}
PER_EXPERT = re.compile(
    r"^(?P<pre>.+?)\.(?P<box>mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\.(?P<part>gate_proj|up_proj|down_proj|w1|w3|w2)$"
)
_PART_OF = {p: (fused, i) for _, (_, parts) in SCHEMES.items() for fused, ps in parts.items() for i, p in enumerate(ps)}


def scheme_for(model_type: str | None) -> str:
    return "mixtral" if model_type in ("mixtral", "phimoe") else "default"


def split_experts(adapter: Adapter, scheme: str) -> Adapter:
    """Every expert slice as its per-expert module(s) in ``scheme``'s names; routers follow the container."""
    from loratools.model.adapter import LoraModule
    from loratools.model.experts import ExpertLoraModule

    box, parts = SCHEMES[scheme]
    modules: dict[str, Any] = {}
    for name, m in adapter.modules.items():
        if not isinstance(m, ExpertLoraModule):
            modules[_router_on_disk(name, box)] = m
            continue
        container, _, leaf = m.parameter.rpartition(".")
        if leaf not in parts or not container.endswith(".mlp.experts"):
            raise UnsupportedError(
                f"expert parameter {m.parameter} has no per-expert form loratools knows (gate_up_proj, down_proj "
                "under mlp.experts)",
                hint="write PEFT target_parameters instead: loratools convert ADAPTER --to peft -o OUT",
            )
        if m.fan_in_fan_out:
            raise UnsupportedError(
                f"expert parameter {m.parameter} stores experts (in, out) (gpt-oss): its gate and up columns "
                "interleave and it has no per-expert modules",
                hint="write PEFT (loratools convert ADAPTER --to peft -o OUT): vLLM loads its target_parameters layout "
                "for such models",
            )
        disk = container[: -len(".mlp.experts")] + f".{box}.experts.{m.expert}"
        names = parts[leaf]
        rows = m.out_features // len(names)
        if rows * len(names) != m.out_features:
            raise ShapeError(f"expert slice {m.key}: {m.out_features} output rows do not split into {names}")
        for i, part in enumerate(names):
            up = m.up[i * rows : (i + 1) * rows]
            modules[f"{disk}.{part}"] = LoraModule(down=m.down, up=up, alpha=m.alpha, use_rslora=m.use_rslora)
    return replace(adapter, modules=modules, meta=dict(adapter.meta))


def _router_on_disk(name: str, box: str) -> str:
    if box != "mlp" and name.endswith(".mlp.gate"):
        return name[: -len(".mlp.gate")] + f".{box}.gate"
    return name


def fuse_experts(adapter: Adapter, num_experts: Any = None, names: set[str] | None = None) -> Adapter:
    """Every per-expert module (or those in ``names``) as expert slices of the fused parameters.

    ``num_experts(parameter)`` gives a parameter's expert count (a base's tensor, a recorded count); without
    it, the highest expert index + 1.
    """
    groups: dict[tuple[str, str, int], dict[int, LoraModule]] = {}
    modules: dict[str, Any] = {}
    for name, m in adapter.modules.items():
        match = PER_EXPERT.match(name)
        if match is None or (names is not None and name not in names):
            modules[name] = m
            continue
        if m.kind != "linear" or m.magnitude is not None or m.bias is not None or m.fan_in_fan_out:
            raise UnsupportedError(f"per-expert module {name}: only plain linear LoRA fuses into expert slices")
        fused, index = _PART_OF[match["part"]]
        groups.setdefault((f"{match['pre']}.mlp.experts.{fused}", fused, int(match["e"])), {})[index] = m
    counts: dict[str, int] = {}
    for parameter, _, e in groups:
        counts[parameter] = max(counts.get(parameter, 0), e + 1)
    for (parameter, fused, e), parts in sorted(groups.items()):
        n = num_experts(parameter) if num_experts is not None else counts[parameter]
        if e >= n:
            raise ShapeError(f"a per-expert module of expert {e} under {parameter}, which holds {n} experts")
        modules[f"{parameter}[{e}]"] = _fused_slice(parameter, e, n, parts, 2 if fused == "gate_up_proj" else 1)
    out = replace(adapter, modules=modules, meta=dict(adapter.meta))
    for name in list(out.modules):
        if name.endswith(".block_sparse_moe.gate"):  # Mixtral's router: the module the experts' parameters sit by
            out.modules[name[: -len(".block_sparse_moe.gate")] + ".mlp.gate"] = out.modules.pop(name)
    return out


def _fused_slice(parameter: str, e: int, n: int, parts: dict[int, LoraModule], count: int) -> Any:
    import torch

    from loratools.model.experts import ExpertLoraModule

    present = [parts[i] for i in sorted(parts)]
    first = present[0]
    common = dict(parameter=parameter, expert=e, num_experts=n, use_rslora=first.use_rslora)
    if count == 1:
        return ExpertLoraModule(down=first.down, up=first.up, alpha=first.alpha, **common)
    if len({m.use_rslora for m in present}) > 1 or len({m.in_features for m in present}) > 1:
        raise UnsupportedError(f"the gate and up modules of expert {e} under {parameter} disagree (rsLoRA, width)")
    if len(parts) == 2:
        g, u = parts[0], parts[1]
        if g.rank == u.rank and g.scale == u.scale and torch.equal(g.down, u.down):  # one A: the fused form
            return ExpertLoraModule(down=g.down, up=torch.cat([g.up, u.up]), alpha=g.alpha, **common)
    rows = first.out_features
    ups, downs = [], []
    for i in range(count):
        m = parts.get(i)
        if m is None:
            ups.append(None)
            continue
        downs.append(m.down.float())
        ups.append((m.up.float() * m.scale, m.rank))
    rank = sum(u[1] for u in ups if u is not None)
    b = torch.zeros(rows * count, rank)
    col = 0
    for i, u in enumerate(ups):
        if u is not None:
            b[i * rows : (i + 1) * rows, col : col + u[1]] = u[0]
            col += u[1]
    dtype = first.up.dtype
    alpha = rank**0.5 if first.use_rslora else rank  # scale 1: the scales are in B
    return ExpertLoraModule(down=torch.cat(downs).to(dtype), up=b.to(dtype), alpha=alpha, **common)
