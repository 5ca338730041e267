"""One name table per diffusion-transformer family, behind one interface, for the readers and writers in this package.

A table answers, for its family: the original-layout path of a kohya name without its ``lora_unet_`` prefix
(``from_kohya``), the diffusers path(s) of an original path (``to_diffusers``: several for a fused projection),
the original path of a diffusers one with its part index and count (``to_original``), the row counts of a fused
weight's parts (``part_rows``), the one module whose row halves are swapped (``SWAPPED``) and the tensor whose
name tells an original-layout single file and its prefix (``PROBE``). Flux's table is :mod:`.flux` itself;
families whose original layout renames modules one to one (Wan, Qwen-Image) are a :class:`RenamedTable`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loratools.formats.dit import (
    chroma,
    cogvideox,
    flux,
    hidream,
    hunyuan_video,
    ltx_video,
    lumina2,
    qwen_image,
    sd3,
    wan,
)
from loratools.formats.dit.renamed import RenamedTable


def table_for(family: str) -> Any:
    """The name table of ``family`` (a key of ``layouts.LABELS`` in ``layouts.HANDLED``)."""
    return {"flux": flux, "wan": wan.TABLE, "cogvideox": cogvideox.TABLE, "qwen_image": qwen_image.TABLE,
            "sd3": sd3.TABLE, "hunyuan_video": hunyuan_video.TABLE,
            "lumina2": lumina2.LUMINA2, "z_image": lumina2.Z_IMAGE, "chroma": chroma, "hidream": hidream.TABLE,
            "ltx_video": ltx_video.TABLE}[family]


#: every family, in the order their markers are tried (Chroma's and Z-Image's are Flux's and Lumina2's)
FAMILIES = ("flux", "sd3", "hunyuan_video", "wan", "qwen_image", "lumina2", "hidream")


def original_family(names: Iterable[str]) -> str | None:
    """The family one of whose original-layout marker tensors (``PROBE``) is among ``names`` (a base's tensor names,
    bare or under a prefix), else None: how a GGUF file without ``general.architecture`` is told a diffusion model."""
    probes = [(f, table_for(f).PROBE) for f in FAMILIES]
    for name in names:
        for family, probe in probes:
            if probe.match(name):
                return family
    return None


__all__ = ["FAMILIES", "RenamedTable", "original_family", "table_for"]
