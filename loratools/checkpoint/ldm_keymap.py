"""Stable Diffusion single-file checkpoints in the original (LDM/SGM) layout, named as diffusers names them.

A1111, ComfyUI and sd-scripts' ``merge_lora.py`` keep SD1/SD2/SDXL as one ``.safetensors`` file with the
original training code's names: the UNet under ``model.diffusion_model.`` (``input_blocks.N.M``,
``middle_block.N``, ``output_blocks.N.M``; resnet parts ``in_layers.2`` / ``emb_layers.1`` / ``out_layers.3`` /
``skip_connection``; downsamplers ``op``), the text encoder(s) under ``cond_stage_model.`` (SD1: a Hugging Face
CLIP under ``.transformer.``; SD2: OpenCLIP under ``.model.``) or ``conditioner.embedders.0.transformer.``
(SDXL, HF CLIP) and ``conditioner.embedders.1.model.`` (SDXL, OpenCLIP), and the VAE under
``first_stage_model.``. LoRAs name modules after the diffusers pipeline (``unet.down_blocks.0.attentions.0.
proj_in``, kohya's ``lora_unet_down_blocks_0_attentions_0_proj_in``, ``lora_te_text_model_encoder_...``) or,
for sd-scripts' SDXL UNet, after the original UNet (``lora_unet_input_blocks_4_1_...``).

:func:`ldm_layout` reads the layout from the checkpoint's keys alone and maps every diffusers module path
(component-prefixed) to the module that holds it here. The block numbering follows the conversion tables of
diffusers (``convert_ldm_unet_checkpoint``) and sd-scripts (``library/model_util.py``, ``sdxl_model_util.py``):
with ``L`` resnets per block, ``input_blocks.(1 + b·(L+1) + l)`` is ``down_blocks.b`` layer ``l``, the ``L``-th
is its downsampler, and ``output_blocks.(b·(L+1) + l)`` is ``up_blocks.b`` layer ``l``, whose upsampler sits
beside the last layer. OpenCLIP stores an attention's q, k and v projections stacked in one
``attn.in_proj_weight`` (3·d rows): they become the *fused parts* ``<attn>.in_proj.q`` / ``.k`` / ``.v``, each
a third of that tensor's rows; ``c_fc`` / ``c_proj`` / ``ln_1`` / ``ln_2`` are ``fc1`` / ``fc2`` / ``layer_norm1`` /
``layer_norm2``. Nothing here reads tensor data, and nothing here imports loratools: it is a name table
read by both the base's key matching (``checkpoint/keymap.py``) and kohya's name resolution
(``formats/kohya.py``), and formats import no checkpoint code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

UNET = "model.diffusion_model."
#: single-file prefix -> (pipeline component, layout) of each text encoder
TEXT_ENCODERS = {
    "cond_stage_model.transformer.": ("text_encoder", "clip"),
    "cond_stage_model.model.": ("text_encoder", "open_clip"),
    "conditioner.embedders.0.transformer.": ("text_encoder", "clip"),
    "conditioner.embedders.1.model.": ("text_encoder_2", "open_clip"),
    "conditioner.embedders.0.model.": ("text_encoder_2", "open_clip"),  # the SDXL refiner's only encoder
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_OPEN_CLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                    "ln_1": "layer_norm1", "ln_2": "layer_norm2"}  # fmt: skip
_OPEN_CLIP_TOP = {"token_embedding": "embeddings.token_embedding", "ln_final": "final_layer_norm"}
#: q, k, v: the order of the thirds of a fused ``in_proj_weight``
FUSED_PARTS = ("q", "k", "v")
_BLOCK = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.+)$")


@dataclass(frozen=True)
class FusedPart:
    """A module stored as rows ``[index·n/parts, (index+1)·n/parts)`` of tensor ``key`` (n = its first dim)."""

    key: str
    index: int
    parts: int = 3


@dataclass
class LdmLayout:
    """The diffusers names of an LDM single file's modules."""

    version: str  # "sd1" | "sd2" | "sdxl"
    #: component-prefixed diffusers module path -> module path in this file (a fused part's own path)
    aliases: dict[str, str] = field(default_factory=dict)
    #: per component, other local names that name the same modules (the original UNet's own paths)
    local_names: dict[str, dict[str, str]] = field(default_factory=dict)
    #: fused part path (``...attn.in_proj.q``) -> where its rows are
    fused: dict[str, FusedPart] = field(default_factory=dict)
    #: aliases without CLIP's ``text_model.`` level (transformers 5's names), beside the full ones
    short_aliases: set[str] = field(default_factory=set)
    #: module path in this file -> the name the same module has in a diffusers pipeline saved by this
    #: transformers (``CLIPTextModel`` without ``text_model.``, ``CLIPTextModelWithProjection`` with it)
    pipeline_names: dict[str, str] = field(default_factory=dict)

    def component_names(self, component: str) -> dict[str, str]:
        """Every local module name of ``component`` (diffusers path without the component, original UNet
        path for the UNet) -> its module path in this file."""
        out = dict(self.local_names.get(component, {}))
        prefix = component + "."
        for alias, path in self.aliases.items():
            if alias.startswith(prefix) and alias not in self.short_aliases:
                out[alias[len(prefix) :]] = path
        return out


def is_ldm(keys: Iterable[str]) -> bool:
    """True for a single file with the original layout's UNet (``model.diffusion_model.*``; a ComfyUI Flux file
    has that prefix too, over ``double_blocks.``/``single_blocks.``: not a UNet)."""
    unet = [k for k in keys if k.startswith(UNET)]
    return bool(unet) and not any(k.startswith((UNET + "double_blocks.", UNET + "single_blocks.")) for k in unet)


def _layers_per_block(unet_paths: list[str]) -> int | None:
    """Resnets per UNet block, from where the first downsampler (or upsampler) sits."""
    downs = [int(m.group(1)) for p in unet_paths if (m := re.match(r"^input_blocks\.(\d+)\.0\.op$", p))]
    if downs:
        return min(downs) - 1
    ups = [int(m.group(1)) for p in unet_paths if (m := re.match(r"^output_blocks\.(\d+)\.[12]\.conv$", p))]
    if ups:
        return min(ups)
    inputs = {int(m.group(1)) for p in unet_paths if (m := re.match(r"^input_blocks\.(\d+)\.", p))}
    return max(inputs) if inputs else None  # one block: every input block after conv_in is a layer


def _resnet(rest: str) -> str:
    for ldm, diff in _RESNET.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diff + rest[len(ldm) :]
    return rest


def unet_diffusers_path(path: str, layers: int) -> str | None:
    """The diffusers UNet path of original-UNet module ``path`` (``input_blocks.1.1.proj_in`` ->
    ``down_blocks.0.attentions.0.proj_in``), or None when it has none."""
    if path in _TOP:
        return _TOP[path]
    m = _BLOCK.match(path)
    if not m:
        return None
    kind, i, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if kind == "middle_block":  # middle_block.N.rest: no inner index
        rest = f"{j}.{rest}" if j is not None else rest
        return {0: f"mid_block.resnets.0.{_resnet(rest)}", 1: f"mid_block.attentions.0.{rest}",
                2: f"mid_block.resnets.1.{_resnet(rest)}"}.get(i)  # fmt: skip
    if j is None:
        return None
    j_ = int(j)
    if kind == "input_blocks":
        if i == 0:
            return None
        b, layer = divmod(i - 1, layers + 1)
        if layer == layers:
            return f"down_blocks.{b}.downsamplers.0.conv{rest[2:]}" if j_ == 0 and rest.split(".")[0] == "op" else None
        if j_ == 0:
            return f"down_blocks.{b}.resnets.{layer}.{_resnet(rest)}"
        return f"down_blocks.{b}.attentions.{layer}.{rest}"
    b, layer = divmod(i, layers + 1)
    if j_ == 0:
        return f"up_blocks.{b}.resnets.{layer}.{_resnet(rest)}"
    if rest.split(".")[0] == "conv":
        return f"up_blocks.{b}.upsamplers.0.{rest}"
    return f"up_blocks.{b}.attentions.{layer}.{rest}"


def _open_clip_path(rest: str) -> str | None:
    m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", rest)
    if m:
        inner = m.group(2)
        for oc, hf in _OPEN_CLIP_LAYER.items():
            if inner == oc:
                return f"text_model.encoder.layers.{m.group(1)}.{hf}"
        return None
    return f"text_model.{_OPEN_CLIP_TOP[rest]}" if rest in _OPEN_CLIP_TOP else None


def ldm_layout(keys: Iterable[str]) -> LdmLayout | None:
    """The layout of an LDM single file from its tensor names, or None when it is not one."""
    keys = list(keys)
    if not is_ldm(keys):
        return None
    modules = [k[: -len(".weight")] for k in keys if k.endswith(".weight")]
    unet = [m[len(UNET) :] for m in modules if m.startswith(UNET)]
    sdxl = any(k.startswith("conditioner.embedders.") for k in keys) or any(p.startswith("label_emb.") for p in unet)
    open_clip_sd2 = any(k.startswith("cond_stage_model.model.") for k in keys)
    layout = LdmLayout(version="sdxl" if sdxl else "sd2" if open_clip_sd2 else "sd1")
    layers = _layers_per_block(unet)
    own: dict[str, str] = {}
    for p in unet:
        own[p] = UNET + p
        diff = unet_diffusers_path(p, layers) if layers is not None else None
        if diff is not None:
            layout.aliases[f"unet.{diff}"] = UNET + p
    layout.local_names["unet"] = own
    for prefix, (component, kind) in TEXT_ENCODERS.items():
        for m in (m for m in modules if m.startswith(prefix)):
            rest = m[len(prefix) :]
            if kind == "clip":
                hf = rest if rest.startswith("text_model.") else f"text_model.{rest}"
            else:
                hf = _open_clip_path(rest)
            if hf is not None:
                layout.aliases[f"{component}.{hf}"] = m
        if kind == "open_clip":
            for k in keys:
                m = re.match(r"^(.*transformer\.resblocks\.(\d+)\.attn)\.in_proj_weight$", k[len(prefix) :])
                if not k.startswith(prefix) or not m:
                    continue
                for index, part in enumerate(FUSED_PARTS):
                    virtual = f"{prefix}{m.group(1)}.in_proj.{part}"
                    layout.fused[virtual] = FusedPart(k, index)
                    layer = f"text_model.encoder.layers.{m.group(2)}.self_attn.{part}_proj"
                    layout.aliases[f"{component}.{layer}"] = virtual
    # transformers 5 saves CLIP without the ``text_model.`` level, so a diffusers LoRA may name it either way
    for alias, path in list(layout.aliases.items()):
        component, _, rest = alias.partition(".")
        if rest.startswith("text_model."):
            short = f"{component}.{rest[len('text_model.') :]}"
            if short not in layout.aliases:
                layout.aliases[short] = path
                layout.short_aliases.add(short)
    for alias, path in layout.aliases.items():
        component = alias.partition(".")[0]
        short = alias in layout.short_aliases
        if short == (component == "text_encoder") or not alias.startswith("text_encoder"):
            layout.pipeline_names.setdefault(path, alias)
    return layout
