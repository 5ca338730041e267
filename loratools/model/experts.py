"""Expert LoRA in the canonical model: one :class:`ExpertLoraModule` per expert of a stacked expert parameter.

A mixture-of-experts layer may hold its experts as one 3-D parameter (``mlp.experts.gate_up_proj``,
``(E, out, in)`` or ``(E, in, out)``). A LoRA on such a parameter is E independent low-rank updates; the
canonical model keeps each one as a plain LoRA (its own ``down`` (r, in) and ``up`` (out, r)) and names the
expert explicitly: the module key is ``<parameter path>[<expert>]`` and the module records the parameter,
its expert index and the expert count. ``delta()`` is the update of ``parameter[expert]`` in the
parameter's own layout (``fan_in_fan_out`` when the parameter stores each expert as ``(in, out)``).

Every algebra that works on a LoRA module works on an expert slice unchanged; what cannot hold expert
slices (a file format that has no place for them) refuses them with :func:`refuse_write`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratools.errors import ShapeError, UnsupportedError
from loratools.model.adapter import LoraModule

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter

_KEY = re.compile(r"^(?P<parameter>.+)\[(?P<expert>\d+)\]$")


def expert_key(parameter: str, expert: int) -> str:
    """The module key of one expert's slice: ``model.layers.0.mlp.experts.gate_up_proj[3]``."""
    return f"{parameter}[{expert}]"


def parse_expert_key(key: str) -> tuple[str, int] | None:
    """``(parameter, expert)`` of an expert slice's key, else None."""
    m = _KEY.match(key)
    return (m["parameter"], int(m["expert"])) if m else None


@dataclass
class ExpertLoraModule(LoraModule):
    """One expert's LoRA update of a stacked expert parameter: ΔW = scale · B · A of ``parameter[expert]``.

    ``orientation_known`` is False when the reader could not tell whether the parameter stores each expert
    as ``(out, in)`` or ``(in, out)`` (``fan_in_fan_out`` is then provisional): a merge decides it from the
    base's tensor shape and refuses when that cannot (a square expert matrix).
    """

    parameter: str = ""
    expert: int = 0
    num_experts: int = 0
    orientation_known: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "linear":
            raise ShapeError(f"expert slice {self.parameter}[{self.expert}] must be linear, got {self.kind}")
        if not self.parameter or not 0 <= self.expert < self.num_experts:
            raise ShapeError(
                f"expert slice {self.parameter!r}[{self.expert}] needs a parameter path and an expert index "
                f"below the expert count ({self.num_experts})"
            )

    @property
    def key(self) -> str:
        return expert_key(self.parameter, self.expert)


def is_expert(m: Any) -> bool:
    return isinstance(m, ExpertLoraModule)


def has_experts(adapter: Adapter) -> bool:
    return any(is_expert(m) for m in adapter.modules.values())


def expert_groups(adapter: Adapter) -> dict[str, list[ExpertLoraModule]]:
    """Expert slices grouped by their parameter, each list sorted by expert index."""
    groups: dict[str, list[ExpertLoraModule]] = {}
    for m in adapter.modules.values():
        if isinstance(m, ExpertLoraModule):
            groups.setdefault(m.parameter, []).append(m)
    return {p: sorted(ms, key=lambda m: m.expert) for p, ms in sorted(groups.items())}


def touched(m: LoraModule) -> bool:
    """Whether the slice changes its expert at all (both factors non-zero)."""
    return bool(m.up.count_nonzero()) and bool(m.down.count_nonzero()) and m.scale != 0


def expert_summary(adapter: Adapter) -> list[dict[str, Any]]:
    """One record per stacked expert parameter: expert count, ranks per expert, which experts are touched."""
    records = []
    for parameter, slices in expert_groups(adapter).items():
        ranks = sorted({m.rank for m in slices})
        records.append(
            {
                "parameter": parameter,
                "num_experts": slices[0].num_experts,
                "experts_present": len(slices),
                "rank": ranks[0] if len(ranks) == 1 else None,
                "ranks": ranks,
                "alpha": slices[0].alpha if len({m.alpha for m in slices}) == 1 else None,
                "layout": "(E, in, out)" if slices[0].fan_in_fan_out else "(E, out, in)",
                "layout_known": all(m.orientation_known for m in slices),
                "touched": [m.expert for m in slices if touched(m)],
                "in_features": slices[0].in_features,
                "out_features": slices[0].out_features,
            }
        )
    return records


#: the formats whose writers pack expert slices (PEFT target_parameters; the per-expert serving layout)
EXPERT_WRITERS = ("peft", "vllm-moe")
#: why a format has no place for expert LoRA, and the way out, where more can be said than "none"
_NO_PLACE = {
    "gguf": (
        "llama.cpp has no runtime expert LoRA (a GGUF adapter adapts 2-D matrix multiplications by tensor name; the "
        "experts are one 3-D ffn_*_exps tensor per layer)",
        "merge it into the GGUF base (loratools merge BASE.gguf ADAPTER -o merged.gguf writes each expert's ΔW into "
        "ffn_*_exps); loratools convert ADAPTER --to gguf --exclude '\\]$' ... writes the rest",
    ),
}


def refuse_write(adapter: Adapter, fmt: str) -> None:
    """UnsupportedError (one line naming a slice) when ``adapter`` holds expert slices and ``fmt`` has no place
    for them: writing them as ordinary modules would name modules no model has."""
    if fmt in EXPERT_WRITERS:
        return
    for name, m in adapter.modules.items():
        if isinstance(m, ExpertLoraModule) and fmt in _NO_PLACE:
            why, hint = _NO_PLACE[fmt]
            raise UnsupportedError(f"writing {fmt}: module {name} is one expert's slice: {why}", hint=hint)
        if isinstance(m, ExpertLoraModule):
            raise UnsupportedError(
                f"writing {fmt}: module {name} is one expert's slice of a LoRA on the expert parameter "
                f"{m.parameter}; {fmt} has no place for expert LoRA",
                hint="write PEFT target_parameters (loratools convert ADAPTER --to peft -o OUT) or per-expert modules "
                "(loratools convert ADAPTER --to vllm-moe -o OUT), or merge it into the base (loratools merge BASE "
                "ADAPTER -o OUT); loratools convert ADAPTER --exclude '\\]$' -o OUT leaves the expert slices out",
            )
