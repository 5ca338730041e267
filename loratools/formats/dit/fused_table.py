"""A name table for a family whose original layout fuses some of diffusers' modules (SD3, HunyuanVideo): the
interface of :mod:`.tables` over a few dicts, as :mod:`.flux` spells it out for Flux.

A fused original module lists its diffusers parts in row order; its part rows are thirds (a ``qkv``) or, for the
module named in ``qkv_mlp``, ``D, D, D, rest`` with ``D`` its input width (q, k, v and the MLP of a single-stream
block). ``swap`` tells the modules whose two row halves diffusers holds in the other order (shift, scale ->
scale, shift), from the original path and the weight's shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

Parts = tuple[str, ...]


@dataclass(frozen=True)
class FusedTable:
    """``blocks``: (original block list, diffusers block list, original path inside a block -> diffusers parts);
    ``top``: top-level original path -> diffusers parts; ``probe``: a tensor every original-layout single file of
    the family holds (group 1: the file's prefix)."""

    FAMILY: str
    blocks: tuple[tuple[str, str, dict[str, Parts]], ...]
    top: dict[str, Parts]
    probe: str
    EXAMPLES: str
    swap: Callable[[str, int, int], bool]
    qkv_mlp: str | None = None
    mlp_ratio: int = 4
    #: original modules that are Conv2d (their LoRA factors are 4-D: down k×k, up 1×1)
    CONV: frozenset[str] = frozenset()
    SWAPPED: None = None
    _kohya: dict[str, str] = field(init=False, repr=False)
    _back: dict[str, tuple[str, int, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        kohya = {k.replace(".", "_"): k for k in self.top}
        back = {p: (k, i, len(parts)) for k, parts in self.top.items() for i, p in enumerate(parts)}
        object.__setattr__(self, "_kohya", kohya)
        object.__setattr__(self, "_back", back)

    @property
    def PROBE(self) -> re.Pattern[str]:  # noqa: N802 - the same attribute as flux.PROBE
        return re.compile(self.probe)

    def from_kohya(self, underscored: str) -> str | None:
        """The original path of a kohya name without its ``lora_unet_`` prefix (underscores resolved by the table)."""
        if underscored in self._kohya:
            return self._kohya[underscored]
        for block, _, inner in self.blocks:
            m = re.match(rf"^{re.escape(block.replace('.', '_'))}_(\d+)_(.+)$", underscored)
            if m:
                path = next((k for k in inner if k.replace(".", "_") == m.group(2)), None)
                if path is not None:
                    return f"{block}.{m.group(1)}.{path}"
        return None

    def to_diffusers(self, path: str) -> Parts | None:
        if path in self.top:
            return self.top[path]
        for block, diff_block, inner in self.blocks:
            m = re.match(rf"^{re.escape(block)}\.(\d+)\.(.+)$", path)
            if m and m.group(2) in inner:
                return tuple(f"{diff_block}.{m.group(1)}.{p}" for p in inner[m.group(2)])
        return None

    def to_original(self, path: str) -> tuple[str, int, int] | None:
        if path in self._back:
            return self._back[path]
        for block, diff_block, inner in self.blocks:
            m = re.match(rf"^{re.escape(diff_block)}\.(\d+)\.(.+)$", path)
            for orig, parts in inner.items() if m else ():
                if m and m.group(2) in parts:
                    return f"{block}.{m.group(1)}.{orig}", parts.index(m.group(2)), len(parts)
        return None

    def _is_qkv_mlp(self, path: str) -> bool:
        return self.qkv_mlp is not None and path.endswith("." + self.qkv_mlp)

    def part_rows(self, path: str, out_rows: int, in_features: int) -> list[int] | None:
        parts = self.to_diffusers(path)
        if parts is None or len(parts) == 1:
            return [out_rows]
        if self._is_qkv_mlp(path):
            rest = out_rows - 3 * in_features
            return [in_features] * 3 + [rest] if rest > 0 else None
        return [out_rows // 3] * 3 if out_rows % 3 == 0 else None

    def missing_part_rows(self, path: str, index: int, in_features: int, known: dict[int, int]) -> int:
        if self._is_qkv_mlp(path):
            return in_features * self.mlp_ratio if index == 3 else in_features
        return next(iter(known.values()))

    def swapped(self, path: str, out_rows: int, in_features: int) -> bool:
        """Whether original module ``path`` (out_rows × in_features) holds its row halves in the other order."""
        return self.swap(path, out_rows, in_features)


__all__ = ["FusedTable"]
