"""Tiny SD1.5- and SDXL-shaped pipelines, their original (LDM/SGM) single files and kohya LoRAs for them.

Nothing is downloaded: every model is built from a config with random weights, rounded to fp16 (the
single files are fp16, as the released checkpoints are; the oracles start from the same values). The
single files are written with sd-scripts' own diffusers -> original conversions (``kohya_oracle.py``), so the
layout under test is the peer's, not ours. UNets have two resnets per block (what sd-scripts' hard-coded
conversion loops assume).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kohya_oracle as ko  # noqa: E402

#: kohya LoRA targets (diffusers module paths) of the SD1.5-shaped UNet: attention, feed-forward, 1×1 conv
#: proj_in/proj_out, 3×3 resnet convs (LoCon), time embedding projection, shortcut, down/upsamplers, mid block
SD15_UNET_TARGETS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.1.proj_in",
    "down_blocks.0.attentions.0.proj_out",
    "down_blocks.0.resnets.1.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.resnets.1.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
    "mid_block.resnets.1.conv2",
    "up_blocks.0.resnets.2.conv1",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.attentions.2.proj_in",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_k",
)
TE_TARGETS = (
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.0.self_attn.k_proj",
    "text_model.encoder.layers.1.self_attn.v_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.0.mlp.fc1",
    "text_model.encoder.layers.1.mlp.fc2",
)
#: the SDXL-shaped UNet: attention only from the second block on (like SDXL), linear proj_in/proj_out
SDXL_UNET_TARGETS = (
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.1.attentions.0.proj_in",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "mid_block.attentions.0.transformer_blocks.1.attn1.to_out.0",
    "up_blocks.0.attentions.2.proj_out",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.resnets.2.conv_shortcut",
)
#: SDXL's second encoder: every third of the fused in_proj, and q, k, v of one layer together
TE2_TARGETS = (
    *TE_TARGETS,
    "text_model.encoder.layers.1.self_attn.q_proj",
    "text_model.encoder.layers.0.self_attn.v_proj",
)


def _clip_config(projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=100, max_position_embeddings=16, projection_dim=projection or 32,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16)  # fmt: skip


def _fp16_rounded(*models) -> None:
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.copy_(p.half().float())
            m.eval()


def build_sd15(seed: int = 0) -> dict:
    """UNet (conv proj_in/proj_out, 2 resnets per block), CLIP text encoder, VAE."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, use_linear_projection=False,
    )  # fmt: skip
    parts = {"unet": unet, "text_encoder": CLIPTextModel(_clip_config()), "vae": _vae()}
    _fp16_rounded(*parts.values())
    return parts


def build_sd2(seed: int = 2) -> dict:
    """SD2-shaped as sd-scripts holds it: its UNet keeps proj_in/proj_out as 1×1 convs (the original file
    stores them linear); the text encoder is written as OpenCLIP. ``v2`` is a marker (an empty module)."""
    parts = build_sd15(seed)
    parts["v2"] = torch.nn.Module()
    return parts


def build_sdxl(seed: int = 1) -> dict:
    """SDXL-shaped UNet (text_time embedding, linear projections, 2 transformer layers), CLIP + OpenCLIP-style
    encoders, VAE."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )  # fmt: skip
    parts = {
        "unet": unet,
        "text_encoder": CLIPTextModel(_clip_config()),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(32)),
        "vae": _vae(),
    }
    _fp16_rounded(*parts.values())
    return parts


def _with_text_model(sd: dict) -> dict:
    """A CLIPTextModel state dict as released checkpoints hold it (transformers 5 drops ``text_model.``)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}


def ldm_state_dict(parts: dict) -> dict[str, torch.Tensor]:
    """The original single-file layout of a pipeline's parts, by sd-scripts' own conversions."""
    return ldm_from_state_dicts({name: model.state_dict() for name, model in parts.items()})


def ldm_from_state_dicts(sds: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The same from the components' diffusers/transformers state dicts (``unet``, ``text_encoder``, ...)."""
    out: dict[str, torch.Tensor] = {}
    unet = {k: v.detach().clone() for k, v in sds["unet"].items()}
    te = _with_text_model(sds["text_encoder"])
    if "text_encoder_2" in sds:
        converted = ko.convert_diffusers_unet_state_dict_to_sdxl(unet)
        out.update({f"model.diffusion_model.{k}": v for k, v in converted.items()})
        out.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in te.items()})
        te2 = ko.convert_text_encoder_2_state_dict_to_sdxl(sds["text_encoder_2"], torch.tensor(4.6))
        out.update({f"conditioner.embedders.1.model.{k}": v for k, v in te2.items()})
    elif "v2" in sds:  # SD2: linear proj_in/proj_out, OpenCLIP text encoder with fused q/k/v
        out.update({f"model.diffusion_model.{k}": v for k, v in ko.convert_unet_state_dict_to_sd(True, unet).items()})
        out.update(
            {f"cond_stage_model.model.{k}": v for k, v in ko.convert_text_encoder_state_dict_to_sd_v2(te).items()}
        )
    else:
        out.update({f"model.diffusion_model.{k}": v for k, v in ko.convert_unet_state_dict_to_sd(False, unet).items()})
        out.update({f"cond_stage_model.transformer.{k}": v for k, v in te.items()})
    out.update({f"first_stage_model.{k}": v for k, v in ko.convert_vae_state_dict(dict(sds["vae"])).items()})
    return {k: v.detach().to(torch.float16).contiguous() for k, v in out.items() if v.is_floating_point()}


def save_pipeline(parts: dict, path: Path) -> Path:
    """The same parts as a diffusers pipeline folder (no tokenizers: only merged, never run)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    half = {k: v.half() for k, v in parts.items()}
    if "text_encoder_2" in parts:
        pipe = StableDiffusionXLPipeline(**half, tokenizer=None, tokenizer_2=None, scheduler=DDIMScheduler())
    else:
        pipe = StableDiffusionPipeline(**half, tokenizer=None, scheduler=DDIMScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(str(path), safe_serialization=True)
    for m in parts.values():
        m.float()
    return path


def pipeline_ldm(folder: Path) -> dict[str, torch.Tensor]:
    """A (merged) pipeline folder converted to the original layout by sd-scripts' conversions."""
    from safetensors.torch import load_file

    sds = {}
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        files = sorted((folder / comp).glob("*.safetensors")) if (folder / comp).is_dir() else []
        if files:
            sds[comp] = {k: v for f in files for k, v in load_file(str(f)).items()}
    return ldm_from_state_dicts(sds)


def save_ldm(parts: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(ldm_state_dict(parts), str(path), metadata={"format": "pt"})
    return path


def sgm_name(diffusers_module: str) -> str:
    """sd-scripts' SDXL (original UNet) module path of a diffusers UNet module, by its own conversion map."""
    converted = ko.convert_diffusers_unet_state_dict_to_sdxl({diffusers_module + ".weight": None})
    return next(iter(converted))[: -len(".weight")]


def kohya_lora(parts: dict, seed: int = 5, linear_as_conv: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A kohya LoRA over the parts: ranks 3/4, alphas ≠ rank, random non-zero factors (fp16, as trained ones are).

    SD1.5 UNet names are diffusers paths (sd-scripts' SD1 UNet uses them), SDXL UNet names the original
    UNet's (sd-scripts' SDXL UNet); ``linear_as_conv`` stores those linear modules' factors as 1×1 convs (what
    sd-scripts writes for SD2's linear proj_in/proj_out, which its UNet holds as convs).
    """
    g = torch.Generator().manual_seed(seed)
    sdxl = "text_encoder_2" in parts
    targets = [("lora_unet_", parts["unet"], m, sgm_name(m) if sdxl else m)
               for m in (SDXL_UNET_TARGETS if sdxl else SD15_UNET_TARGETS)]  # fmt: skip
    te = parts["text_encoder"]
    prefix = "lora_te1_" if sdxl else "lora_te_"
    targets += [(prefix, te, m, m) for m in TE_TARGETS]
    if sdxl:
        targets += [("lora_te2_", parts["text_encoder_2"], m, m) for m in TE2_TARGETS]
    sd: dict[str, torch.Tensor] = {}
    for i, (prefix, model, path, name) in enumerate(targets):
        layer = model.get_submodule(path if path in dict(model.named_modules()) else path.removeprefix("text_model."))
        r, alpha = 3 + i % 2, 2.0 + (i % 3)
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(r, layer.in_channels, *layer.kernel_size, generator=g)
            up = torch.randn(layer.out_channels, r, 1, 1, generator=g)
        else:
            down = torch.randn(r, layer.in_features, generator=g)
            up = torch.randn(layer.out_features, r, generator=g)
            if path in linear_as_conv:
                down, up = down[:, :, None, None], up[:, :, None, None]
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = (down * 0.3).half()
        sd[f"{key}.lora_up.weight"] = (up * 0.3).half()
        sd[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return sd


def kohya_merged_ldm(parts: dict, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What sd-scripts' merge_lora.py / sdxl_merge_lora.py write: the parts in fp32 (merge_dtype float),
    its module map and update loop, then its conversion back to the original layout, saved as fp16."""
    import copy

    parts = {k: copy.deepcopy(v).float() for k, v in parts.items()}
    sdxl = "text_encoder_2" in parts
    unet_names = sgm_path_of if sdxl else (lambda p: p)
    te_targets = ko.TEXT_ENCODER_TARGET_REPLACE_MODULE
    unet_targets = ko.UNET_TARGET_REPLACE_MODULE + ko.UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
    roots = [
        ("lora_unet", parts["unet"], unet_targets, unet_names),
        ("lora_te1" if sdxl else "lora_te", parts["text_encoder"], te_targets, _text_model_path),
    ]
    if sdxl:
        roots.append(("lora_te2", parts["text_encoder_2"], te_targets, lambda p: p))
    lora32 = {k: v.float() for k, v in lora.items()}
    ko.merge_lora_sd(ko.name_to_module_map(roots), lora32)
    return ldm_state_dict(parts)


def _text_model_path(path: str) -> str:
    return path if path.startswith("text_model.") else f"text_model.{path}"


def sgm_path_of(path: str) -> str:
    return sgm_name(path)
