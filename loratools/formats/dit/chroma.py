"""Chroma (lodestones' Chroma1, ``ChromaTransformer2DModel``): Flux's blocks without their modulation linears, and
the ``distilled_guidance_layer`` that computes every block's modulation instead.

Its LoRA files use Flux's names in every layout (diffusers' ``ChromaPipeline`` loads them with Flux's loader,
``FluxLoraLoaderMixin``), so this is :mod:`.flux`'s table plus the guidance layer, after diffusers'
``single_file_utils.convert_chroma_transformer_checkpoint_to_diffusers``: ``distilled_guidance_layer.in_proj`` and
``out_proj`` keep their names, ``distilled_guidance_layer.layers.N.in_layer/out_layer`` are ``…layers.N.linear_1
/linear_2``. ``img_attn.qkv`` and ``single_blocks.N.linear1`` split as Flux's do; Chroma has no ``norm_out.linear``
(so nothing is swapped).
"""

from __future__ import annotations

import re

from loratools.formats.dit import flux

FAMILY = "chroma"
_GUIDE = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.(in_layer|out_layer)$")
_GUIDE_DIFF = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.(linear_1|linear_2)$")
_KOHYA_GUIDE = re.compile(r"^distilled_guidance_layer_layers_(\d+)_(in_layer|out_layer)$")
_PROJ = ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.out_proj")
_LINEAR = {"in_layer": "linear_1", "out_layer": "linear_2"}
_BACK = {v: k for k, v in _LINEAR.items()}


def from_kohya(underscored: str) -> str | None:
    m = _KOHYA_GUIDE.match(underscored)
    if m:
        return f"distilled_guidance_layer.layers.{m.group(1)}.{m.group(2)}"
    proj = next((p for p in _PROJ if p.replace(".", "_") == underscored), None)
    return proj or flux.bfl_path(underscored)


def to_diffusers(path: str) -> tuple[str, ...] | None:
    if path in _PROJ:
        return (path,)
    m = _GUIDE.match(path)
    if m:
        return (f"distilled_guidance_layer.layers.{m.group(1)}.{_LINEAR[m.group(2)]}",)
    return flux.to_diffusers(path)


def to_original(path: str) -> tuple[str, int, int] | None:
    if path in _PROJ:
        return path, 0, 1
    m = _GUIDE_DIFF.match(path)
    if m:
        return f"distilled_guidance_layer.layers.{m.group(1)}.{_BACK[m.group(2)]}", 0, 1
    return flux.to_bfl(path)


part_rows = flux.part_rows
missing_part_rows = flux.missing_part_rows
SWAPPED = flux.SWAPPED
PROBE = flux.PROBE
EXAMPLES = "double_blocks.N.img_attn.qkv, single_blocks.N.linear1, distilled_guidance_layer.layers.N.in_layer ..."

__all__ = ["FAMILY", "from_kohya", "to_diffusers", "to_original"]
