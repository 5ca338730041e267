"""A name table for a family whose original layout renames diffusers' modules one to one (Wan, Qwen-Image): the
interface of :mod:`.tables` over two dicts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RenamedTable:
    """A family whose original modules are diffusers' modules under other names (nothing fused, nothing swapped).

    ``block``/``diff_block``: the block list's name in each layout; ``inner``: original path inside a block ->
    diffusers path inside it; ``top``: top-level original path -> diffusers path; ``probe``: a tensor every
    original-layout single file of the family holds (group 1: the file's prefix)."""

    FAMILY: str
    block: str
    diff_block: str
    inner: dict[str, str]
    top: dict[str, str]
    probe: str
    EXAMPLES: str
    SWAPPED: None = None
    _kohya_inner: dict[str, str] = field(init=False, repr=False)
    _kohya_top: dict[str, str] = field(init=False, repr=False)
    _back_inner: dict[str, str] = field(init=False, repr=False)
    _back_top: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "_kohya_inner", {k.replace(".", "_"): k for k in self.inner})
        set_(self, "_kohya_top", {k.replace(".", "_"): k for k in self.top})
        set_(self, "_back_inner", {v: k for k, v in self.inner.items()})
        set_(self, "_back_top", {v: k for k, v in self.top.items()})

    @property
    def PROBE(self) -> re.Pattern[str]:  # noqa: N802 - the same attribute as flux.PROBE
        return re.compile(self.probe)

    def from_kohya(self, underscored: str) -> str | None:
        if underscored in self._kohya_top:
            return self._kohya_top[underscored]
        m = re.match(rf"^{self.block}_(\d+)_(.+)$", underscored)
        inner = self._kohya_inner.get(m.group(2)) if m else None
        return f"{self.block}.{m.group(1)}.{inner}" if m and inner else None

    def to_diffusers(self, path: str) -> tuple[str, ...] | None:
        if path in self.top:
            return (self.top[path],)
        m = re.match(rf"^{self.block}\.(\d+)\.(.+)$", path)
        inner = self.inner.get(m.group(2)) if m else None
        return (f"{self.diff_block}.{m.group(1)}.{inner}",) if m and inner else None

    def to_original(self, path: str) -> tuple[str, int, int] | None:
        if path in self._back_top:
            return self._back_top[path], 0, 1
        m = re.match(rf"^{self.diff_block}\.(\d+)\.(.+)$", path)
        inner = self._back_inner.get(m.group(2)) if m else None
        return (f"{self.block}.{m.group(1)}.{inner}", 0, 1) if m and inner else None

    def part_rows(self, path: str, out_rows: int, in_features: int) -> list[int] | None:
        return [out_rows]

    def missing_part_rows(self, path: str, index: int, in_features: int, known: dict[int, int]) -> int:
        return next(iter(known.values()))


__all__ = ["RenamedTable"]
