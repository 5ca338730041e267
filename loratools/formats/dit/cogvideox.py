"""CogVideoX (THUDM CogVideoX-2b/5b/1.5, ``CogVideoXTransformer3DModel``): one set of module names in every layout
read here, and the layouts that only their names tell from LTX-Video's.

- diffusers/PEFT ``transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`` (diffusers'
  ``examples/cogvideo/train_cogvideox_lora.py``, finetrainers; ``CogVideoXLoraLoaderMixin`` converts nothing);
- CogVideoX-Fun (aigc-apps, and kijai's ComfyUI-CogVideoXWrapper ``lora_utils.py``, which loads them): a kohya
  network over the whole ``CogVideoXTransformer3DModel``, so its names are ``lora_unet`` + ``.`` + ``""`` + ``.`` +
  the diffusers path with ``.`` -> ``_``: ``lora_unet__transformer_blocks_0_attn1_to_q`` (two underscores),
  ``lora_down``/``lora_up``/``alpha``, every Linear (the Conv2d ``patch_embed.proj`` skipped), merged as
  W += alpha/rank · up·down; its text-encoder part is ``lora_te_`` + the T5 path (``text_encoder``);
- ComfyUI-style ``diffusion_model.<diffusers path>`` (written here; CogVideoX-Fun's merge reads it too).

Nothing is fused, renamed or swapped. THUDM's SAT training (``sat/`` with SwissArmyTransformer's LoRA mixin:
``…layers.N.attention.query_key_value.matrix_A.0``) is refused by name: convert it with THUDM's
``tools/export_sat_lora_weight.py`` (which drops SAT's alpha/r scaling: THUDM's ``tools/load_cogvideox_lora.py``
applies the export at ``set_adapters(..., lora_alpha / lora_r)``, SAT's alpha 1 by default).

LTX-Video names its attentions ``attn1``/``attn2`` inside ``transformer_blocks`` too: a kohya/ComfyUI file on
``attn1`` and ``ff`` only is either; :func:`resolve` decides from CogVideoX-Fun's double underscore, the base (its
transformer class or single file) or refuses in one line saying what to pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.errors import UnsupportedError
from loratools.formats.dit.renamed import RenamedTable

if TYPE_CHECKING:
    from loratools.formats.dit.layouts import DitLayout
    from loratools.formats.registry import KeyResolver

FAMILY = "cogvideox"
_BLOCK = ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm2.linear",
          "ff.net.0.proj", "ff.net.2")  # fmt: skip
TOP = ("patch_embed.text_proj", "time_embedding.linear_1", "time_embedding.linear_2", "ofs_embedding.linear_1",
       "ofs_embedding.linear_2", "norm_out.linear", "proj_out")  # fmt: skip
#: CogVideoX-Fun's kohya prefix (``lora_unet`` + ``.`` + an empty module name, dots written ``_``)
KOHYA_PREFIX = "lora_unet__"


@dataclass(frozen=True)
class CogVideoXTable(RenamedTable):
    KOHYA_PREFIX: str = KOHYA_PREFIX

    def from_kohya(self, underscored: str) -> str | None:
        """CogVideoX-Fun's ``_transformer_blocks_0_attn1_to_q`` (``lora_unet_`` removed) or the one-underscore
        form."""
        return super().from_kohya(underscored[1:] if underscored.startswith("_") else underscored)


TABLE = CogVideoXTable(
    FAMILY=FAMILY, block="transformer_blocks", diff_block="transformer_blocks", inner={p: p for p in _BLOCK},
    top={p: p for p in TOP}, probe=r"^(.*?)transformer_blocks\.\d+\.norm2\.linear\.weight$",
    EXAMPLES="transformer_blocks.N.attn1.to_q, transformer_blocks.N.norm1.linear, patch_embed.text_proj ...",
)  # fmt: skip

_CLASSES = {"CogVideoXTransformer3DModel": FAMILY, "LTXVideoTransformer3DModel": "ltx_video"}


def base_family(base: KeyResolver | None) -> str | None:
    """``cogvideox`` / ``ltx_video`` when the base tells (its transformer's class, or a single file's marker)."""
    if base is None:
        return None
    comp = base.components.get("transformer") if base.kind == "pipeline" else base
    cls = ((comp.config or {}).get("_class_name") if comp is not None else None) or ""
    if cls in _CLASSES:
        return _CLASSES[cls]
    if base.kind == "file":
        from loratools.formats.dit import ltx_video

        for family, probe in ((FAMILY, TABLE.PROBE), ("ltx_video", ltx_video.TABLE.PROBE)):
            if any(probe.match(k) for k in base.keys()):
                return family
    return None


def resolve(path: object, found: DitLayout, keys: list[str], base: KeyResolver | None) -> DitLayout:
    """A file whose names LTX-Video and CogVideoX share (``transformer_blocks.N.attn1``/``ff`` only) as the one
    family its kohya prefix or the base tells; refused in one line saying what to pass when neither does."""
    from loratools.formats.dit.layouts import DitLayout

    if found.family != "ltx_cogvideo":
        return found
    told = FAMILY if any(k.startswith(KOHYA_PREFIX) for k in keys) else base_family(base)
    if told is not None:
        return DitLayout(told, found.layout, found.example)
    raise UnsupportedError(
        f"{path}: {found.example!r}: this LoRA trains transformer_blocks.N.attn1 / ff only, names that LTX-Video "
        "and CogVideoX share, and neither its names nor its metadata tell which it is for",
        hint="pass the base it is for: loratools merge BASE ADAPTER -o OUT, or loratools info/convert ADAPTER "
        "--base BASE (an LTX-Video or CogVideoX pipeline, transformer folder or single file)",
        path=path,
    )


def shared_layout(layout: str) -> str:
    """The family to write an attn1/ff-only adapter (names LTX-Video shares) as: ComfyUI names are the same for
    both; kohya's are not (CogVideoX-Fun ``lora_unet__``, LTX-Video ``lora_unet_``), refused in one line."""
    if layout == "comfyui":
        return FAMILY
    raise UnsupportedError(
        "this LoRA trains transformer_blocks.N.attn1 / ff only, names that LTX-Video and CogVideoX share, and their "
        "kohya names differ (CogVideoX-Fun writes lora_unet__, LTX-Video lora_unet_)",
        hint="write it as ComfyUI (the same names for both: loratools convert ADAPTER --to comfyui -o C.safetensors); "
        "loratools convert C.safetensors --to kohya --base BASE -o OUT then writes the base family's kohya names",
    )


__all__ = ["FAMILY", "KOHYA_PREFIX", "TABLE", "TOP", "base_family", "resolve", "shared_layout"]
