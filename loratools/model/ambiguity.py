"""Inputs whose update is a guess: where an adapter's own files disagree on something that changes ΔW.

Today that is a PEFT config whose declared rank (``r`` / ``rank_pattern``) differs from the tensors'
rank: PEFT refuses to load such a file, and the scale alpha/r depends on which of the two is right.
``validate`` reports these as errors; every command that writes refuses them unless the user says
which side to trust (``--trust-tensors``: the tensors' rank, so scale = alpha / tensor rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import ValidationError, name_list

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter

TRUST_HINT = (
    "fix r / rank_pattern in adapter_config.json to match the tensors, or pass --trust-tensors to use the "
    "tensors' rank"
)


@dataclass(frozen=True)
class Ambiguity:
    """One module whose update depends on which of two disagreeing sources is right."""

    module: str
    declared_rank: int
    tensor_rank: int

    def message(self) -> str:
        return (
            f"module {self.module}: adapter_config.json declares rank {self.declared_rank} (r / rank_pattern) "
            f"but the tensors have rank {self.tensor_rank}; PEFT will refuse to load it"
        )


def ambiguities(adapter: Adapter) -> list[Ambiguity]:
    """The modules of ``adapter`` whose update is ambiguous (empty for a consistent adapter)."""
    declared = adapter.meta.get("declared_ranks") or {}
    found = []
    for name, m in sorted(adapter.modules.items()):
        want = declared.get(name)
        rank = getattr(m, "rank", None)
        if want is not None and rank is not None and want != rank:
            found.append(Ambiguity(name, int(want), int(rank)))
    return found


def require_unambiguous(adapter: Adapter, *, trust_tensors: bool = False) -> None:
    """Raise :class:`ValidationError` naming the modules when ``adapter``'s update is a guess.

    With ``trust_tensors`` the tensors win (scale = alpha / tensor rank) and nothing is raised.
    """
    if trust_tensors:
        return
    found = ambiguities(adapter)
    if not found:
        return
    source = adapter.meta.get("source") or (adapter.meta.get("files") or ["the adapter"])[0]
    first = found[0]
    raise ValidationError(
        f"{source}: adapter_config.json declares rank {first.declared_rank} but the tensors have rank "
        f"{first.tensor_rank} in {len(found)} module(s) ({name_list([a.module for a in found], 3)}); the scale "
        "alpha/r is ambiguous, so the result would be a guess",
        hint=TRUST_HINT,
        path=Path(str(source)),
    )
