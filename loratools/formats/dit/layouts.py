"""Which diffusion-transformer family and which trainer's layout a LoRA file is, from its tensor names alone.

Layouts (how a file names modules): ``kohya`` (sd-scripts, musubi-tuner: ``lora_unet_<path with _>``),
``comfyui`` (``diffusion_model.<path>``: ComfyUI, ai-toolkit's Qwen-Image files, musubi's ``convert_lora.py``
output), ``bfl`` (BFL's own files: bare ``double_blocks.…``), ``original`` (the bare original path of another
family: DiffSynth-Studio's Wan and Qwen-Image files), ``diffusers``
(PEFT keys under ``transformer.``), ``xlabs`` (``…processor.qkv_lora1``) and ``bfl-control`` (BFL's
Canny/Depth LoRAs, which also replace norm scales and widen ``img_in``). Families are told by the module names
their architectures use (the original names for kohya/ComfyUI files, diffusers' for ``transformer.`` keys); see
the converters in diffusers' ``loaders/lora_conversion_utils.py`` for each family's names.

:func:`refuse_unhandled` gives the one line for what is recognized but not read yet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loratools.errors import UnsupportedError

#: family -> how messages name it
LABELS = {
    "flux": "Flux",
    "hunyuan_video": "HunyuanVideo",
    "sd3": "SD3",
    "wan": "Wan",
    "qwen_image": "Qwen-Image",
    "lumina2": "Lumina2",
    "z_image": "Z-Image",
    "hidream": "HiDream",
    "chroma": "Chroma",
    "ltx_cogvideo": "LTX-Video/CogVideoX",
    "ltx_video": "LTX-Video",
    "cogvideox": "CogVideoX",
}
#: the families loratools reads in each layout (the others are refused by name)
HANDLED = {"cogvideox", "ltx_video", "flux", "wan", "qwen_image", "sd3", "hunyuan_video", "lumina2", "z_image",
           "chroma", "hidream"}  # fmt: skip
#: (family, pattern on the module name with ``.`` and ``_`` both written ``[._]``), first match wins; the
#: HunyuanVideo and Chroma markers come before Flux, whose double/single blocks they share
_FAMILY_MARKS: tuple[tuple[str, str], ...] = (
    ("hunyuan_video", r"^(double_blocks[._]\d+[._](img|txt)_(mlp[._]fc[12]|mod[._]linear)|single_blocks[._]\d+[._]"
     r"modulation[._]linear|txt_in[._]individual_token_refiner|context_embedder[._]token_refiner"
     r"|double_blocks\.\d+\.(img|txt)_attn_(qkv|proj)|(time|guidance)_in[._]mlp)"),
    ("chroma", r"^distilled_guidance_layer"),
    ("flux", r"^(double_blocks[._]\d+[._](img|txt)_(attn|mlp|mod)|single_blocks[._]\d+[._](linear[12]|modulation)"
     r"|single_transformer_blocks[._]\d+[._]|final_layer[._](linear|adaLN)|(img|txt|time|vector|guidance)_in([._]|$)"
     r"|x_embedder$)"),
    ("sd3", r"^joint_blocks[._]"),
    ("hidream", r"^(double_stream_blocks|single_stream_blocks)[._]"),
    ("qwen_image", r"^transformer_blocks[._]\d+[._](img_mlp|txt_mlp|img_mod|txt_mod)"),
    ("cogvideox", r"^blocks\.\d+\.(attn1\.to_out|norm[12]\.linear|ff\.[02])$"),  # DiffSynth's CogDiT (cogvideox.py)
    ("wan", r"^(blocks[._]\d+[._](self_attn|cross_attn|ffn|attn[12][._](to_|add_[kv]_proj))|condition_embedder[._])"),
    ("lumina2", r"^((layers|noise_refiner|context_refiner)[._]\d+[._](attention|attn|feed_forward|adaLN_modulation)"
     r"|all_x_embedder|all_final_layer|time_caption_embed[._])"),
    ("ltx_video", r"^(patchify_proj|adaln_single[._]|caption_projection[._]linear"
     r"|transformer_blocks[._]\d+[._]attn2[._])"),
    ("cogvideox", r"^(transformer_blocks[._]\d+[._]norm2[._]linear|patch_embed[._]text_proj|ofs_embedding[._]linear"
     r"|blocks[._]\d+[._](attn_out|ff_proj|ff_out)$)"),  # not time_embedding_linear_N: SD's UNet
    ("ltx_cogvideo", r"^transformer_blocks[._]\d+[._]attn[12][._]"),
    ("sd3", r"^(pos_embed[._]proj|transformer_blocks[._]\d+[._]attn2[._])"),
)
#: layout prefixes stripped before the family patterns (which match the module path from its root)
_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "model.diffusion_model.", "diffusion_model.",
             "transformer.")  # fmt: skip
_COMPILED = tuple((f, re.compile(p)) for f, p in _FAMILY_MARKS)
#: a Qwen-Image file that trains attention only: its block names are Flux's diffusers ones, so this tells it only
#: in the kohya/ComfyUI/bare layouts (Flux writes double_blocks there) and without Flux's single blocks
_QWEN_ATTN = re.compile(r"^transformer_blocks[._]\d+[._]attn[._](to_|add_)")
_QWEN_PREFIXES = ("lora_unet_", "model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class DitLayout:
    family: str  # a key of LABELS
    layout: str  # kohya | comfyui | bfl | diffusers | xlabs | bfl-control
    example: str  # one tensor name that told it

    @property
    def label(self) -> str:
        return LABELS.get(self.family, self.family)


def _layout_of(key: str) -> str | None:
    bare = key.removeprefix("diffusion_model.")
    if bare.startswith(("double_blocks.", "single_blocks.")) and re.search(r"\.processor\.\w+_lora\d*\.", bare):
        return "xlabs"
    if _SAT.search(key):
        return "sat"
    if key.startswith(("lora_unet_", "lora_transformer_")):
        return "kohya"
    if key.startswith(("diffusion_model.", "model.diffusion_model.")):
        return "comfyui"
    if key.startswith("transformer."):
        return "diffusers"
    if key.startswith(("double_blocks.", "single_blocks.", "final_layer.", "img_in.", "txt_in.")):
        return "bfl"
    if key.startswith(("blocks.", "transformer_blocks.", "joint_blocks.", "noise_refiner.", "context_refiner.",
                       "double_stream_blocks.", "single_stream_blocks.")) or _NEXTDIT.match(key):
        return "original"
    return None


#: a bare NextDiT (Lumina2/Z-Image) name: not ``layers.N.feed_forward.w1`` alone, which Meta's Llama layout shares
#: THUDM SAT LoRA tensors (SwissArmyTransformer's LoRA mixin: one A and one B per part of a fused linear)
_SAT = re.compile(r"\.(attention|cross_attention)\.(query_key_value|dense)\.matrix_[AB]\.\d+$")
_NEXTDIT = re.compile(r"^layers\.\d+\.(attention\.(qkv|out|to_[qkv]|to_out)|attn\.to_|adaLN_modulation)")


def family_of(name: str) -> str | None:
    """The family module name ``name`` belongs to (a layout prefix stripped), or None when no family marks it."""
    name = next((name[len(p) :] for p in _PREFIXES if name.startswith(p)), name)
    for family, pattern in _COMPILED:
        if pattern.search(name):
            return family
    return None


def detect(keys: Iterable[str]) -> DitLayout | None:
    """The family and layout of a LoRA file's tensor names, or None when it is no diffusion-transformer file
    (an SD1/SD2/SDXL kohya file, a PEFT file of a language model)."""
    keys = list(keys)
    layout = example = None
    for k in keys:
        found = _layout_of(k)
        if found is not None:
            layout, example = found, k
            if found in ("xlabs", "sat"):
                break
    if layout is None or example is None:
        return None
    if layout == "bfl" and any(k.endswith("query_norm.scale") for k in keys):
        layout = "bfl-control"
    families: dict[str, str] = {}
    qwen_attn = layout in ("kohya", "comfyui", "original") and not any("single_transformer_blocks" in k for k in keys)
    for k in keys:
        f = family_of(k.rsplit(".lora", 1)[0])
        bare = next((k[len(p) :] for p in _QWEN_PREFIXES if k.startswith(p)), k)
        if f is None and qwen_attn and _QWEN_ATTN.search(bare):
            f = "qwen_image"
        if f is not None:
            families.setdefault(f, k)
    if layout == "sat":  # THUDM's SAT training of CogVideoX (formats/dit/cogvideox.py)
        return DitLayout("cogvideox", layout, example)
    if not families:
        return DitLayout("flux", layout, example) if layout in ("xlabs",) else None
    # the HunyuanVideo/Chroma markers decide over Flux's shared block names, Qwen-Image's, Wan's and SD3's over the
    # top-level names Flux shares with them (img_in, txt_in, final_layer)
    if "cogvideox" in families:  # DiffSynth's CogDiT: its blocks.N.attn1.to_q/k/v are Wan's diffusers names too
        families.pop("wan", None)
    family = next((f for f in ("hunyuan_video", "chroma", "qwen_image", "wan", "sd3", "hidream", "lumina2", "flux",
                               "ltx_video", "cogvideox")
                   if f in families), None)
    family = family or next(iter(families))
    if family == "lumina2":  # one original module tree, two diffusers models (formats/dit/lumina2.py)
        from loratools.formats.dit.lumina2 import variant

        family = variant(keys)
        families.setdefault(family, families["lumina2"])
    if family in ("ltx_cogvideo", "ltx_video") and _sd35_diffusers(keys):
        families.setdefault("sd3", families[family])
        family = "sd3"
    if layout == "bfl" and family not in ("flux", "chroma"):
        layout = "original"  # bare names of another family that starts with img_in/txt_in too (Qwen-Image)
    return DitLayout(family, layout, families[family])


_ATTN1 = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn1\.")
_JOINT_ATTN = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn\.(to_|add_)")


def _sd35_diffusers(keys: list[str]) -> bool:
    """SD3.5's MMDiT-X attn2 beside the joint attn (``transformer_blocks.N.attn.``, never attn1): LTX-Video and
    CogVideoX name their attentions attn1/attn2 and have no ``attn.``."""
    return not any(_ATTN1.search(k) for k in keys) and any(_JOINT_ATTN.search(k) for k in keys)


def original_layout(keys: Iterable[str]) -> DitLayout | None:
    """:func:`detect` for a file in any layout but diffusers' (those are ``formats/diffusers.py``'s)."""
    found = detect(keys)
    return found if found is not None and found.layout != "diffusers" else None


_LAYOUT_WORDS = {
    "kohya": "kohya/musubi-tuner layout",
    "comfyui": "ComfyUI layout",
    "bfl": "BFL layout",
    "original": "bare-name layout (no prefix, as DiffSynth-Studio writes)",
    "diffusers": "diffusers layout",
    "xlabs": "XLabs layout",
    "bfl-control": "BFL control-LoRA layout (it also replaces norm scales and widens img_in)",
    "sat": "SAT layout (THUDM's SwissArmyTransformer training: matrix_A/matrix_B per part of query_key_value)",
}


def transformer_class(base: Any) -> str:
    """The ``_class_name`` of ``base``'s transformer config (a pipeline's ``transformer/`` component, else the base
    itself, a KeyResolver); ``""`` where it has none."""
    comp = base.components.get("transformer") if base.kind == "pipeline" else base
    return ((comp.config or {}).get("_class_name") if comp is not None else None) or ""


def describe(found: DitLayout) -> str:
    """``a Flux LoRA in the kohya/musubi-tuner layout``."""
    article = "an" if found.family in ("sd3", "ltx_cogvideo") else "a"
    return f"{article} {found.label} LoRA in the {_LAYOUT_WORDS.get(found.layout, found.layout)}"


_SAT_HINT = ("convert it with THUDM/CogVideo's tools/export_sat_lora_weight.py, which writes diffusers names without "
             "SAT's alpha/r scaling, then loratools merge BASE ADAPTER -o OUT --weights ALPHA/R (SAT's alpha is 1 by "
             "default; THUDM's "
             "load_cogvideox_lora.py applies the export at lora_alpha/lora_r)")  # fmt: skip


def refuse_unhandled(path: object, found: DitLayout) -> None:
    """One clear line for a family or layout recognized but not read yet."""
    read = ("kohya", "comfyui", "diffusers", "bfl" if found.family in ("flux", "chroma") else "original",
            "xlabs" if found.family == "flux" else "", "bfl-control" if found.family == "flux" else "")
    if found.family in HANDLED and found.layout in read:
        return
    raise UnsupportedError(
        f"{path}: {found.example!r}: this is {describe(found)}, which loratools does not read yet "
        "(diffusion transformers: Flux, SD3, HunyuanVideo, Wan, Qwen-Image, Lumina2, Z-Image, Chroma, HiDream, "
        "LTX-Video and CogVideoX in the kohya, ComfyUI and diffusers layouts, and in their original bare names; "
        "Flux's XLabs and BFL control files)",
        hint=_SAT_HINT if found.layout == "sat" else "a diffusers-layout file (transformer.<module>.lora_A.weight) "
        "of any family merges into its diffusers pipeline; for this layout use the trainer's own tools for now",
        path=path,
    )


__all__ = ["HANDLED", "LABELS", "DitLayout", "describe", "detect", "family_of", "original_layout", "refuse_unhandled"]
