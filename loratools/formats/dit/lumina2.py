"""Lumina2 (Lumina-Image 2.0) and Z-Image (Tongyi-MAI Z-Image, Turbo and its fine-tunes): one original module tree
(Alpha-VLLM's NextDiT, which ComfyUI runs for both, ``comfy/ldm/lumina/model.py``), two sets of diffusers names.

Original names, in ComfyUI/sd-scripts files (``diffusion_model.`` / ``lora_unet_`` + the path) and in the
ComfyUI single files: ``{layers,noise_refiner,context_refiner}.N.attention.qkv`` (q, k and v fused),
``attention.out``, ``feed_forward.w1/w2/w3``, ``adaLN_modulation.{1|0}``, ``x_embedder``, ``t_embedder.mlp.0/2``,
``cap_embedder.1``, ``final_layer.linear``, ``final_layer.adaLN_modulation.1``.

- **Lumina2** (``Lumina2Transformer2DModel``), after diffusers' ``_convert_non_diffusers_lumina2_lora_to_diffusers``
  and ``single_file_utils.convert_lumina2_to_diffusers``: ``attention.qkv`` is ``attn.to_q/to_k/to_v`` with rows
  ``hidden, kv, kv`` (grouped-query attention: 24 query heads, 8 key/value heads; diffusers hard-codes 2304/768,
  here the rows come from the tensor: the query is as wide as the input), ``attention.out`` is ``attn.to_out.0``,
  ``w1/w2/w3`` are ``linear_1/2/3``, ``adaLN_modulation.1`` is ``norm1.linear``; ``t_embedder``/``cap_embedder``
  are under ``time_caption_embed``; ``final_layer.adaLN_modulation.1``/``final_layer.linear`` are
  ``norm_out.linear_1``/``norm_out.linear_2``. Nothing is swapped (the final modulation is a scale only).
- **Z-Image** (``ZImageTransformer2DModel``), after ``_convert_non_diffusers_z_image_lora_to_diffusers`` and
  ``single_file_utils.convert_z_image_transformer_checkpoint_to_diffusers``: diffusers keeps Tongyi's own names
  (``attention.to_q/to_k/to_v``, ``attention.to_out.0``, ``feed_forward.w1..3``, ``adaLN_modulation.0``,
  ``all_x_embedder.2-1``, ``all_final_layer.2-1.*``), which musubi-tuner (``zimage/zimage_model.py``) and
  ai-toolkit also write; ``attention.qkv`` splits in thirds (its attention has as many key/value heads as query
  heads). Both name sets are read under every prefix; files are written in Tongyi's split names (``SPLIT_FILES``:
  the names diffusers, musubi and ComfyUI's ``z_image_to_diffusers`` key map all load), and merged into a
  ComfyUI single file under its fused names, into a single file in Tongyi's names (Comfy-Org's fp8 files) under
  those.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loratools.formats.dit.block_table import BlockTable

_BLOCKS = ("layers", "noise_refiner", "context_refiner")
_PROBE = r"^(.*?)layers\.\d+\.attention\.qkv\.weight$"

LUMINA2 = BlockTable(
    FAMILY="lumina2", blocks=_BLOCKS,
    inner={
        "attention.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "attention.out": ("attn.to_out.0",),
        "feed_forward.w1": ("feed_forward.linear_1",), "feed_forward.w2": ("feed_forward.linear_2",),
        "feed_forward.w3": ("feed_forward.linear_3",), "adaLN_modulation.1": ("norm1.linear",),
    },
    top={
        "x_embedder": ("x_embedder",), "t_embedder.mlp.0": ("time_caption_embed.timestep_embedder.linear_1",),
        "t_embedder.mlp.2": ("time_caption_embed.timestep_embedder.linear_2",),
        "cap_embedder.1": ("time_caption_embed.caption_embedder.1",),
        "final_layer.adaLN_modulation.1": ("norm_out.linear_1",), "final_layer.linear": ("norm_out.linear_2",),
    },
    probe=_PROBE, EXAMPLES="layers.N.attention.qkv, layers.N.feed_forward.w1, noise_refiner.N.adaLN_modulation.1 ...",
)  # fmt: skip

_Z_INNER = {"attention.to_q": "attention.to_q", "attention.to_k": "attention.to_k", "attention.to_v": "attention.to_v",
            "attention.to_out.0": "attention.to_out.0"}  # fmt: skip
Z_IMAGE = BlockTable(
    FAMILY="z_image", blocks=_BLOCKS, thirds=True, SPLIT_FILES=True,
    split_probe=r"^(.*?)layers\.\d+\.attention\.to_q\.weight$",
    inner={
        "attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
        "attention.out": ("attention.to_out.0",), "feed_forward.w1": ("feed_forward.w1",),
        "feed_forward.w2": ("feed_forward.w2",), "feed_forward.w3": ("feed_forward.w3",),
        "adaLN_modulation.0": ("adaLN_modulation.0",),
    },
    top={
        "x_embedder": ("all_x_embedder.2-1",), "t_embedder.mlp.0": ("t_embedder.mlp.0",),
        "t_embedder.mlp.2": ("t_embedder.mlp.2",), "cap_embedder.1": ("cap_embedder.1",),
        "final_layer.linear": ("all_final_layer.2-1.linear",),
        "final_layer.adaLN_modulation.1": ("all_final_layer.2-1.adaLN_modulation.1",),
    },
    aliases=_Z_INNER,
    top_aliases={k: k for k in ("all_x_embedder.2-1", "all_final_layer.2-1.linear",
                                "all_final_layer.2-1.adaLN_modulation.1")},
    probe=_PROBE, EXAMPLES="layers.N.attention.to_q (or .qkv), layers.N.feed_forward.w1, all_x_embedder.2-1 ...",
)  # fmt: skip

#: names only Lumina2's diffusers or original modules have, and names only Z-Image's have
_LUMINA2_ONLY = (".attn.", "norm1.linear", "feed_forward.linear_", "time_caption_embed", "norm_out.",
                 "adaLN_modulation.1", "adaLN_modulation_1")  # fmt: skip
_Z_IMAGE_ONLY = ("attention.to_", "attention_to_", "adaLN_modulation.0", "adaLN_modulation_0", "all_x_embedder",
                 "all_final_layer")  # fmt: skip


def variant(keys: Iterable[str]) -> str:
    """``lumina2`` or ``z_image`` for a NextDiT file's tensor names: the names only one of them has (a block's
    ``adaLN_modulation.1`` is Lumina2's, ``.0`` Z-Image's; ``attn.`` vs ``attention.to_q``); a file with neither
    (only fused ``attention.qkv``/``out``/``feed_forward``) is read as Z-Image, the family trainers target today."""
    for k in keys:
        name = k.replace("final_layer.adaLN_modulation.1", "final_layer").replace("final_layer_adaLN_modulation_1", "")
        if any(w in name for w in _Z_IMAGE_ONLY):
            return "z_image"
        if any(w in name for w in _LUMINA2_ONLY):
            return "lumina2"
    return "z_image"




def refine(found: Any, tensors: dict[str, Any], base: Any) -> Any:
    """A NextDiT file whose names fit both (only fused ``attention.qkv``/``out``/``feed_forward``): Lumina2 when a
    ``qkv`` holds other than three equal parts (grouped-query attention) or the base is Lumina2 (its transformer's
    class, or a single file with a block's ``adaLN_modulation.1``); ``found`` as it is otherwise."""
    from dataclasses import replace

    if found.family != "z_image" or any(w in k for k in tensors for w in _Z_IMAGE_ONLY):
        return found
    for k, t in tensors.items():
        if k.endswith(("attention.qkv.lora_up.weight", "attention.qkv.lora_B.weight", "attention_qkv.lora_up.weight")):
            down = next((tensors[k.replace(a, b)] for a, b in (("lora_up", "lora_down"), ("lora_B", "lora_A"))
                         if k.replace(a, b) in tensors), None)  # fmt: skip
            if down is not None and down.ndim == 2 and t.ndim == 2 and t.shape[0] != 3 * down.shape[1]:
                return replace(found, family="lumina2")
    if base is None:
        return found
    comp = base.components.get("transformer") if base.kind == "pipeline" else base
    cls = ((getattr(comp, "config", None) or {}).get("_class_name") if comp is not None else None) or ""
    if cls == "Lumina2Transformer2DModel" or (base.kind == "file" and any(
            k.endswith("layers.0.adaLN_modulation.1.weight") for k in base.keys())):  # fmt: skip
        return replace(found, family="lumina2")
    return found


__all__ = ["LUMINA2", "Z_IMAGE", "refine", "variant"]
