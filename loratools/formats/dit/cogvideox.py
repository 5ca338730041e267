"""CogVideoX (THUDM CogVideoX-2b/5b/1.5, ``CogVideoXTransformer3DModel``): one set of module names in every layout
read here, and the layouts that only their names tell from LTX-Video's.

- diffusers/PEFT ``transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`` (diffusers'
  ``examples/cogvideo/train_cogvideox_lora.py``, finetrainers, whose ``lora_config`` metadata carries its
  lora_alpha/r: :mod:`.finetrainers`; ``CogVideoXLoraLoaderMixin`` converts nothing);
- CogVideoX-Fun (aigc-apps, and kijai's ComfyUI-CogVideoXWrapper ``lora_utils.py``, which loads them): a kohya
  network over the whole ``CogVideoXTransformer3DModel``, so its names are ``lora_unet`` + ``.`` + ``""`` + ``.`` +
  the diffusers path with ``.`` -> ``_``: ``lora_unet__transformer_blocks_0_attn1_to_q`` (two underscores),
  ``lora_down``/``lora_up``/``alpha``, every Linear (the Conv2d ``patch_embed.proj`` skipped), merged as
  W += alpha/rank · up·down; its text-encoder part is ``lora_te_`` + the T5 path (``text_encoder``);
- ComfyUI: its own model (``comfy/ldm/cogvideo/model.py``) renames the block modules (``blocks.N.q/k/v``,
  ``attn_out``, ``ff_proj``, ``ff_out``; ``time_embedding_linear_1``), and its LoRA loader binds
  ``diffusion_model.`` + a state-dict path: written so, merged into its checkpoints (``model.diffusion_model.``);
  ``diffusion_model.`` + diffusers' path is read too;
- DiffSynth-Studio 1.x (its CogDiT, ``diffsynth/models/cog_dit.py``; 2.0 dropped CogVideoX): bare or
  ``diffusion_model.`` ``blocks.N.attn1.to_q/to_out``, ``blocks.N.ff.0/2``, ``context_embedder``,
  ``time_embedder.timestep_embedder.0`` with ``lora_A``/``lora_B`` (``.default`` or not), merged as W += up·down
  (``models/lora.py`` GeneralLoRAFromPeft reads no alpha): read as aliases, never written.

Nothing is fused or swapped. THUDM's SAT training (``sat/`` with SwissArmyTransformer's LoRA mixin:
``…layers.N.attention.query_key_value.matrix_A.0``) is refused by name: convert it with THUDM's
``tools/export_sat_lora_weight.py`` (which drops SAT's alpha/r scaling: THUDM's ``tools/load_cogvideox_lora.py``
applies the export at ``set_adapters(..., lora_alpha / lora_r)``, SAT's alpha 1 by default).

LTX-Video names its attentions ``attn1``/``attn2`` inside ``transformer_blocks`` too: a file on ``attn1`` and
``ff`` only in diffusers' names is either; :func:`resolve` decides from CogVideoX-Fun's double underscore, the base
(its transformer class or single file) or refuses in one line saying what to pass (:func:`shared_layout`: such an
adapter is not written as kohya or ComfyUI, whose names differ per family).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.errors import UnsupportedError
from loratools.formats.dit.renamed import RenamedTable

if TYPE_CHECKING:
    from loratools.formats.dit.layouts import DitLayout
    from loratools.formats.registry import KeyResolver

FAMILY = "cogvideox"
#: ComfyUI's own CogVideoX (comfy/ldm/cogvideo/model.py) path inside ``blocks.N`` -> diffusers' inside
#: ``transformer_blocks.N``
INNER = {"norm1.linear": "norm1.linear", "q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v",
         "attn_out": "attn1.to_out.0", "norm2.linear": "norm2.linear", "ff_proj": "ff.net.0.proj",
         "ff_out": "ff.net.2"}  # fmt: skip
TOP = {"patch_embed.text_proj": "patch_embed.text_proj", "time_embedding_linear_1": "time_embedding.linear_1",
       "time_embedding_linear_2": "time_embedding.linear_2", "ofs_embedding_linear_1": "ofs_embedding.linear_1",
       "ofs_embedding_linear_2": "ofs_embedding.linear_2", "norm_out.linear": "norm_out.linear",
       "proj_out": "proj_out"}  # fmt: skip
#: CogVideoX-Fun's kohya prefix (``lora_unet`` + ``.`` + an empty module name, dots written ``_``)
KOHYA_PREFIX = "lora_unet__"
#: DiffSynth-Studio 1.x's CogDiT (``diffsynth/models/cog_dit.py``, ``CogDiTStateDictConverter.from_diffusers``):
#: its path inside ``blocks.N`` -> diffusers' inside ``transformer_blocks.N``, and its top-level paths; its LoRA loader
#: (``models/lora.py`` GeneralLoRAFromPeft) takes ``[diffusion_model.]<path>.lora_B[.default].weight`` as W += up·down
DIFFSYNTH_INNER = {"attn1.to_q": "attn1.to_q", "attn1.to_k": "attn1.to_k", "attn1.to_v": "attn1.to_v",
                   "attn1.to_out": "attn1.to_out.0", "norm1.linear": "norm1.linear", "norm2.linear": "norm2.linear",
                   "ff.0": "ff.net.0.proj", "ff.2": "ff.net.2"}  # fmt: skip
DIFFSYNTH_TOP = {"context_embedder": "patch_embed.text_proj",
                 "time_embedder.timestep_embedder.0": "time_embedding.linear_1",
                 "time_embedder.timestep_embedder.2": "time_embedding.linear_2", "norm_out.linear": "norm_out.linear",
                 "proj_out": "proj_out"}  # fmt: skip
_DIFFSYNTH = RenamedTable(
    FAMILY=FAMILY, block="blocks", diff_block="transformer_blocks", inner=DIFFSYNTH_INNER, top=DIFFSYNTH_TOP,
    probe=r"^$", EXAMPLES="",
)  # fmt: skip
#: the diffusers names as a table of their own (read as aliases: CogVideoX-Fun's kohya names, diffusers-named
#: ``diffusion_model.`` files, bare single files of the diffusers transformer)
_DIFFUSERS = RenamedTable(
    FAMILY=FAMILY, block="transformer_blocks", diff_block="transformer_blocks",
    inner={v: v for v in INNER.values()}, top={v: v for v in TOP.values()}, probe=r"^$", EXAMPLES="",
)  # fmt: skip


@dataclass(frozen=True)
class CogVideoXTable(RenamedTable):
    """ComfyUI's names are the original layout (written for ComfyUI, merged into its checkpoints); diffusers'
    names are read beside them everywhere and written as kohya (CogVideoX-Fun's)."""

    KOHYA_PREFIX: str = KOHYA_PREFIX
    split_probe: str = r"^(.*?)transformer_blocks\.\d+\.norm2\.linear\.weight$"

    def from_kohya(self, underscored: str) -> str | None:
        """CogVideoX-Fun's ``_transformer_blocks_0_attn1_to_q`` (``lora_unet_`` removed: the diffusers path, an
        alias) or ComfyUI's ``blocks_0_q``."""
        bare = underscored[1:] if underscored.startswith("_") else underscored
        return _DIFFUSERS.from_kohya(bare) or super().from_kohya(bare)

    def to_diffusers(self, path: str) -> tuple[str, ...] | None:
        return super().to_diffusers(path) or _DIFFUSERS.to_diffusers(path) or _DIFFSYNTH.to_diffusers(path)

    def is_alias(self, path: str) -> bool:
        """A diffusers or DiffSynth path read as an original one (never written so)."""
        return super().to_diffusers(path) is None and self.to_diffusers(path) is not None

    def kohya_path(self, path: str) -> str:
        """The path CogVideoX-Fun's kohya names spell (diffusers') for an original (ComfyUI) one."""
        parts = self.to_diffusers(path)
        return parts[0] if parts else path

    def split_prefix(self, keys: list[str]) -> str | None:
        """The prefix of a single file in the diffusers names (merged under those names), else None."""
        probe = re.compile(self.split_probe)
        return next((m.group(1) for k in keys if (m := probe.match(k))), None)


TABLE = CogVideoXTable(
    FAMILY=FAMILY, block="blocks", diff_block="transformer_blocks", inner=INNER, top=TOP,
    probe=r"^(.*?)(?<![a-z_])blocks\.\d+\.attn_out\.weight$",
    EXAMPLES="transformer_blocks.N.attn1.to_q (blocks.N.q in ComfyUI's names), transformer_blocks.N.norm1.linear, "
    "patch_embed.text_proj ...",
)  # fmt: skip

_CLASSES = {"CogVideoXTransformer3DModel": FAMILY, "LTXVideoTransformer3DModel": "ltx_video"}


def base_family(base: KeyResolver | None) -> str | None:
    """``cogvideox`` / ``ltx_video`` when the base tells (its transformer's class, or a single file's marker)."""
    from loratools.formats.dit.layouts import transformer_class

    if base is None:
        return None
    cls = transformer_class(base)
    if cls in _CLASSES:
        return _CLASSES[cls]
    if base.kind == "file":
        from loratools.formats.dit import ltx_video

        probes = (TABLE.PROBE, re.compile(TABLE.split_probe), ltx_video.TABLE.PROBE)
        for family, probe in zip((FAMILY, FAMILY, "ltx_video"), probes, strict=True):
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
        hint="pass the base it is for (an LTX-Video or CogVideoX pipeline, transformer folder or single file): "
        "loratools info ADAPTER --base BASE, and merge takes it as its first argument",
        path=path,
    )


def told_by_base(found: DitLayout, base: KeyResolver) -> DitLayout:
    """A diffusers-layout file on ``attn1``/``ff`` only (diffusers' ``train_cogvideox_lora.py`` and finetrainers'
    default targets) as the family its base tells (then written as that family's kohya/ComfyUI), else as it is."""
    from loratools.formats.dit.layouts import DitLayout

    told = base_family(base)
    return DitLayout(told, found.layout, found.example) if told is not None else found


def shared_layout(layout: str) -> str:
    """An attn1/ff-only adapter in diffusers' names (LTX-Video's too) cannot be written as kohya or ComfyUI: both
    families spell those differently (CogVideoX-Fun ``lora_unet__`` + diffusers' path, ComfyUI's CogVideoX
    ``blocks.N.q``; LTX-Video ``lora_unet_`` / ``diffusion_model.transformer_blocks.N.attn1.to_q``)."""
    raise UnsupportedError(
        f"this LoRA trains transformer_blocks.N.attn1 / ff only, names that LTX-Video and CogVideoX share, and its "
        f"{layout} names differ between the two (CogVideoX: lora_unet__… / diffusion_model.blocks.N.q; LTX-Video: "
        "lora_unet_… / diffusion_model.transformer_blocks.N.attn1.to_q), so loratools does not guess",
        hint=f"pass the base it is for (loratools convert ADAPTER --to {layout} --base BASE -o OUT: a CogVideoX or "
        "LTX-Video pipeline, transformer folder or single file), or merge it as it is (loratools merge BASE ADAPTER "
        "-o OUT)",
    )


__all__ = ["FAMILY", "INNER", "KOHYA_PREFIX", "TABLE", "TOP", "base_family", "resolve", "shared_layout", "told_by_base"]
