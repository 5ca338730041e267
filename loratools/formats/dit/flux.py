"""Flux (BFL FLUX.1 dev/schnell and their fine-tunes): the original (BFL) module names and the diffusers ones.

The original checkpoint, sd-scripts/kohya (``lora_unet_`` + the BFL path with ``.`` -> ``_``) and ComfyUI
(``diffusion_model.`` + the BFL path) name modules after BFL's ``flux/model.py``; diffusers'
``FluxTransformer2DModel`` splits two of them. The table follows diffusers'
``loaders/lora_conversion_utils.py`` (``_convert_kohya_flux_lora_to_diffusers``,
``_convert_bfl_flux_control_lora_to_diffusers``) and ``single_file_utils.convert_flux_transformer_checkpoint_
to_diffusers``:

- ``double_blocks.N.img_attn.qkv`` is ``transformer_blocks.N.attn.to_q/to_k/to_v`` (thirds of its rows), the
  ``txt_attn.qkv`` is ``add_q_proj/add_k_proj/add_v_proj``;
- ``single_blocks.N.linear1`` is ``single_transformer_blocks.N.attn.to_q/to_k/to_v`` and ``proj_mlp``: rows
  ``[0, D)``, ``[D, 2D)``, ``[2D, 3D)`` and ``[3D, end)`` with ``D`` its input width (diffusers hard-codes
  3072/12288; here ``D`` comes from the tensor, so any width splits);
- ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its two row halves swapped (BFL: shift,
  scale; diffusers: scale, shift — diffusers' ``swap_scale_shift``);
- every other module is one module under another name (below).

Nothing here reads a file: it is a name table used by the readers and writers in this package.
"""

from __future__ import annotations

import re

FAMILY = "flux"
#: BFL path inside a double block -> diffusers path inside ``transformer_blocks.N`` (a tuple: fused parts)
DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
#: BFL path inside a single block -> diffusers path inside ``single_transformer_blocks.N``
SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
#: top-level BFL module -> diffusers module
TOP: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
#: the BFL module whose diffusers twin holds its two row halves in the other order
SWAPPED = "final_layer.adaLN_modulation.1"
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFF_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_TOP_BACK = {v: k for k, v in TOP.items()}
#: underscored BFL path (a kohya name without its prefix) -> BFL path
_UNDERSCORED_TOP = {k.replace(".", "_"): k for k in TOP}
_UNDERSCORED_DOUBLE = {k.replace(".", "_"): k for k in DOUBLE}
_UNDERSCORED_SINGLE = {k.replace(".", "_"): k for k in SINGLE}
_KOHYA_BLOCK = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")


def bfl_path(underscored: str) -> str | None:
    """The BFL module path of a kohya name without its ``lora_unet_`` prefix, or None when it is not one."""
    if underscored in _UNDERSCORED_TOP:
        return _UNDERSCORED_TOP[underscored]
    m = _KOHYA_BLOCK.match(underscored)
    if not m:
        return None
    table = _UNDERSCORED_DOUBLE if m.group(1) == "double_blocks" else _UNDERSCORED_SINGLE
    inner = table.get(m.group(3))
    return f"{m.group(1)}.{m.group(2)}.{inner}" if inner else None


def to_diffusers(path: str) -> tuple[str, ...] | None:
    """The diffusers module path(s) of BFL module ``path`` (several: its fused parts, in row order)."""
    if path in TOP:
        return (TOP[path],)
    m = _BLOCK.match(path)
    if not m:
        return None
    kind, n, inner = m.groups()
    table, block = (DOUBLE, "transformer_blocks") if kind == "double_blocks" else (SINGLE, "single_transformer_blocks")
    parts = table.get(inner)
    return tuple(f"{block}.{n}.{p}" for p in parts) if parts else None


def to_bfl(path: str) -> tuple[str, int, int] | None:
    """``(BFL module, part index, part count)`` of diffusers module ``path``, or None when Flux has no such one."""
    if path in _TOP_BACK:
        return _TOP_BACK[path], 0, 1
    m = _DIFF_BLOCK.match(path)
    if not m:
        return None
    kind, n, inner = m.groups()
    table, block = (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
    for bfl, parts in table.items():
        if inner in parts:
            return f"{block}.{n}.{bfl}", parts.index(inner), len(parts)
    return None


def part_rows(path: str, out_rows: int, in_features: int) -> list[int] | None:
    """The row counts of the parts of fused BFL module ``path`` (out_rows × in_features), or None when they do
    not fit: thirds for a ``qkv``; ``D, D, D, rest`` (``D`` = input width) for ``linear1``."""
    parts = to_diffusers(path)
    if parts is None or len(parts) == 1:
        return [out_rows]
    if path.endswith(".linear1"):
        rest = out_rows - 3 * in_features
        return [in_features] * 3 + [rest] if rest > 0 else None
    return [out_rows // 3] * 3 if out_rows % 3 == 0 else None


#: a single block's MLP width over its hidden width (every FLUX.1 model: ``mlp_ratio`` 4.0)
MLP_RATIO = 4


def missing_part_rows(path: str, index: int, in_features: int, known: dict[int, int]) -> int:
    """Rows of a fused part no module gives (a LoRA trained on to_q/to_k/to_v without proj_mlp): a qkv third
    equals its siblings; linear1's MLP is ``MLP_RATIO`` times its input width."""
    if path.endswith(".linear1"):
        return in_features * MLP_RATIO if index == 3 else in_features
    return next(iter(known.values()))


# the interface every family's table gives (formats/dit/tables.py)
from_kohya = bfl_path
to_original = to_bfl
#: a tensor every BFL-layout single file holds (group 1: its prefix, "" or ``model.diffusion_model.``)
PROBE = re.compile(r"^(.*?)(double_blocks\.\d+\.img_attn\.qkv|single_blocks\.\d+\.linear1)\.weight$")
EXAMPLES = "double_blocks.N.img_attn.qkv, single_blocks.N.linear1, img_in ..."

__all__ = ["DOUBLE", "FAMILY", "SINGLE", "SWAPPED", "TOP", "bfl_path", "part_rows", "to_bfl", "to_diffusers"]
