"""A name table for a family whose block lists keep their names in every layout and whose modules inside a block
are renamed, fused or kept (Lumina2, Z-Image, HiDream): the interface of :mod:`.tables` over a few dicts.

``inner`` maps an original path inside a block to its diffusers parts (one part: a rename; several: a fused
projection whose rows are the parts in order); ``top`` does the same for top-level modules; ``aliases`` are other
names the trainers write for one diffusers module (Z-Image's ``attention.to_q``, read beside the fused
``attention.qkv``), read but never written. A fused ``qkv`` splits as ``in, (out - in)/2, (out - in)/2`` (the
query is as wide as the input; key and value share the rest — grouped-query attention, Lumina2's 8 of 24 heads)
unless ``thirds`` says the family splits it in equal thirds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loratools.errors import UnsupportedError

Parts = tuple[str, ...]


@dataclass(frozen=True)
class BlockTable:
    FAMILY: str
    blocks: tuple[str, ...]
    inner: dict[str, Parts]
    top: dict[str, Parts]
    probe: str
    EXAMPLES: str
    aliases: dict[str, str] = field(default_factory=dict)
    top_aliases: dict[str, str] = field(default_factory=dict)
    thirds: bool = False
    #: files are written in the diffusers names (the family's trainers write those; read: both)
    SPLIT_FILES: bool = False
    #: a tensor of a single file in the diffusers names (group 1: its prefix), merged under those names
    split_probe: str | None = None
    SWAPPED: None = None
    _kohya: dict[str, str] = field(init=False, repr=False)
    _back: dict[str, tuple[str, int, int]] = field(init=False, repr=False)
    _back_top: dict[str, tuple[str, int, int]] = field(init=False, repr=False)
    _block: re.Pattern[str] = field(init=False, repr=False)
    _kohya_block: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = {**{k: k for k in self.inner}, **{k: k for k in self.aliases}}
        tops = {**{k: k for k in self.top}, **{k: k for k in self.top_aliases}}
        kohya = {k.replace(".", "_"): k for k in tops} | {"\0" + k.replace(".", "_"): k for k in names}
        back = {p: (orig, i, len(parts)) for orig, parts in self.inner.items() for i, p in enumerate(parts)}
        back_top = {p: (orig, i, len(parts)) for orig, parts in self.top.items() for i, p in enumerate(parts)}
        blocks = "|".join(re.escape(b) for b in self.blocks)
        object.__setattr__(self, "_kohya", kohya)
        object.__setattr__(self, "_back", back)
        object.__setattr__(self, "_back_top", back_top)
        object.__setattr__(self, "_block", re.compile(rf"^({blocks})\.(\d+)\.(.+)$"))
        object.__setattr__(self, "_kohya_block", re.compile(rf"^({'|'.join(b.replace('.', '_') for b in self.blocks)})"
                                                              r"_(\d+)_(.+)$"))  # fmt: skip

    @property
    def PROBE(self) -> re.Pattern[str]:  # noqa: N802 - the same attribute as flux.PROBE
        return re.compile(self.probe)

    def split_prefix(self, keys: list[str]) -> str | None:
        """The prefix of a single file that holds the diffusers names (``split_probe``), else None."""
        probe = re.compile(self.split_probe) if self.split_probe else None
        return next((m.group(1) for k in keys if probe and (m := probe.match(k))), None)

    def _parts(self, inner: str, in_block: bool) -> Parts | None:
        table, aliases = (self.inner, self.aliases) if in_block else (self.top, self.top_aliases)
        if inner in table:
            return table[inner]
        return (aliases[inner],) if inner in aliases else None

    def from_kohya(self, underscored: str) -> str | None:
        """The original path (or alias) of a kohya name without its ``lora_unet_`` prefix."""
        if underscored in self._kohya:
            return self._kohya[underscored]
        m = self._kohya_block.match(underscored)
        inner = self._kohya.get("\0" + m.group(3)) if m else None
        if not m or inner is None:
            return None
        block = next(b for b in self.blocks if b.replace(".", "_") == m.group(1))
        return f"{block}.{m.group(2)}.{inner}"

    def to_diffusers(self, path: str) -> Parts | None:
        m = self._block.match(path)
        if m:
            parts = self._parts(m.group(3), True)
            return tuple(f"{m.group(1)}.{m.group(2)}.{p}" for p in parts) if parts else None
        return self._parts(path, False)

    def to_original(self, path: str) -> tuple[str, int, int] | None:
        m = self._block.match(path)
        if not m:
            return self._back_top.get(path)
        found = self._back.get(m.group(3))
        return (f"{m.group(1)}.{m.group(2)}.{found[0]}", found[1], found[2]) if found else None

    def is_alias(self, path: str) -> bool:
        """A name read but not written: the original layout names this module otherwise."""
        m = self._block.match(path)
        return (m.group(3) in self.aliases) if m else path in self.top_aliases

    def part_rows(self, path: str, out_rows: int, in_features: int) -> list[int] | None:
        parts = self.to_diffusers(path)
        if parts is None or len(parts) == 1:
            return [out_rows]
        if self.thirds:
            return [out_rows // 3] * 3 if out_rows % 3 == 0 else None
        rest = out_rows - in_features
        return [in_features, rest // 2, rest // 2] if rest > 0 and rest % 2 == 0 else None

    def missing_part_rows(self, path: str, index: int, in_features: int, known: dict[int, int]) -> int:
        if self.thirds:
            return next(iter(known.values()))
        if index == 0:
            return in_features
        kv = [rows for i, rows in known.items() if i > 0]
        if not kv:
            raise UnsupportedError(
                f"module {path}: only its query part has a LoRA, and the key/value width (grouped-query attention) "
                "is not in the adapter",
                hint="merge it into the base (the base gives the widths), or write it as diffusers: "
                "loratools convert ADAPTER --to diffusers -o OUT",
            )
        return kv[0]


__all__ = ["BlockTable"]
