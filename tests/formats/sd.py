"""A tiny Stable Diffusion pipeline and kohya / diffusers LoRA files for it, built from configs.

Nothing is downloaded: the UNet, VAE and CLIP text encoder are random, no tokenizer is needed (the
pipeline is only used to load and fuse LoRAs, never to generate). The kohya file covers attention
(to_q/to_k/to_v/to_out.0), feed-forward (ff.net.0.proj, ff.net.2), 1×1 conv (proj_in/proj_out with
conv projections), 3×3 conv (resnet conv1/conv2, downsampler) and text-encoder attention and MLP
layers, with alpha ≠ rank and random non-zero up factors.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: modules (diffusers paths, component-prefixed) covered by the kohya fixture, with their kind
KOHYA_UNET_TARGETS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.resnets.0.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.1.resnets.0.conv2",
    "up_blocks.1.resnets.0.conv_shortcut",
)
KOHYA_TE_TARGETS = (
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.0.self_attn.out_proj",
    "encoder.layers.1.mlp.fc1",
    "encoder.layers.1.mlp.fc2",
)
#: kohya names text-encoder modules as the Hub's CLIP checkpoints do, under ``text_model.``
KOHYA_TE_PREFIX = "lora_te_text_model_"


def build_pipeline(seed: int = 0, conv_proj: bool = True):
    """A tiny StableDiffusionPipeline (random weights, no tokenizer, no safety checker)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=not conv_proj,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=100,
            max_position_embeddings=16,
            projection_dim=32,
        )
    )
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=None,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def save_pipeline(pipe, path: str | Path) -> Path:
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def _kohya_name(prefix: str, module: str) -> str:
    return prefix + module.replace(".", "_")


def kohya_state_dict(
    pipe, rank: int = 4, alpha: float = 3.0, seed: int = 2, te: bool = True, uniform_alpha: bool = False
) -> dict[str, torch.Tensor]:
    """A kohya LoRA state dict over the tiny pipeline: random non-zero down and up, alpha ≠ rank.

    Ranks (4, 5) vary by module; alphas too (3, 4, 5) unless ``uniform_alpha``.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    targets = [("lora_unet_", pipe.unet, m) for m in KOHYA_UNET_TARGETS]
    if te:
        targets += [(KOHYA_TE_PREFIX, pipe.text_encoder, m) for m in KOHYA_TE_TARGETS]
    for i, (prefix, model, name) in enumerate(targets):
        layer = model.get_submodule(name)
        r = rank + (i % 2)
        a = alpha if uniform_alpha else alpha + (i % 3)
        key = _kohya_name(prefix, name)
        if isinstance(layer, torch.nn.Conv2d):
            kh, kw = layer.kernel_size
            down = torch.randn(r, layer.in_channels, kh, kw, generator=g) * 0.3
            up = torch.randn(layer.out_channels, r, 1, 1, generator=g) * 0.3
        else:
            down = torch.randn(r, layer.in_features, generator=g) * 0.3
            up = torch.randn(layer.out_features, r, generator=g) * 0.3
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(float(a))
    return sd


KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "3.0",
    "ss_output_name": "tiny",
    "ss_base_model_version": "sd_v1",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "tiny",
}


def save_kohya(sd: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or dict(KOHYA_METADATA))
    return Path(path)


def save_diffusers_lora(pipe, path: str | Path, rank: int = 4, alpha: float = 6.0, seed: int = 3) -> Path:
    """A diffusers LoRA written by diffusers' own ``save_lora_weights`` (PEFT adapters on UNet and text encoder)."""
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet)
    te = copy.deepcopy(pipe.text_encoder)
    ucfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["to_q", "to_v", "proj_in", "conv1"],
        init_lora_weights=False,
        rank_pattern={"conv1": rank + 2},
        alpha_pattern={"to_v": alpha + 1},
    )
    tcfg = LoraConfig(r=rank, lora_alpha=alpha + 3, target_modules=["q_proj", "fc1"], init_lora_weights=False)
    unet.add_adapter(ucfg)
    te = inject_adapter_in_model(tcfg, te)  # transformers' add_adapter wants a newer PEFT
    StableDiffusionPipeline.save_lora_weights(
        str(path),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=ucfg.to_dict(),
        text_encoder_lora_adapter_metadata=tcfg.to_dict(),
        safe_serialization=True,
    )
    return Path(path)
