"""Tiny random-weight SD3.5 and HunyuanVideo transformers, their original-layout single files, and LoRAs in each
layout their trainers write (sd-scripts / musubi-tuner kohya names, ComfyUI ``diffusion_model.``, bare original
names with lora_A/B, diffusers ``transformer.``).

The diffusers -> original weight names here are written out by hand as the inverse of diffusers'
``single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers`` and ``convert_hunyuan_video_transformer_to_
diffusers`` (test_sd3_hunyuan checks that diffusers' converters take them back exactly), independently of
``loratools/formats/dit/sd3.py`` and ``hunyuan_video.py``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore", category=FutureWarning)

SD3_CONFIG = dict(
    sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    caption_projection_dim=16, joint_attention_dim=12, pooled_projection_dim=8, out_channels=4,
    dual_attention_layers=(0,), qk_norm="rms_norm",
)  # fmt: skip  (SD3.5: an MMDiT-X attn2 in block 0, qk norms; block 1 is the pre_only one)
HV_CONFIG = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=12,
    pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
)  # fmt: skip


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def _sd3_groups(n_layers: int) -> list[tuple[str, list[str], bool]]:
    """(original stem, diffusers stems in row order, halves swapped) for SD3."""
    out = [
        ("x_embedder.proj", ["pos_embed.proj"], False), ("context_embedder", ["context_embedder"], False),
        ("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"], False),
        ("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"], False),
        ("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"], False),
        ("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"], False),
        ("final_layer.linear", ["proj_out"], False), ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True),
    ]  # fmt: skip
    for i in range(n_layers):
        j, t = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        x, c = j + "x_block.", j + "context_block."
        out += [
            (x + "attn.qkv", [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"], False),
            (c + "attn.qkv", [t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"], False),
            (x + "attn2.qkv", [t + "attn2.to_q", t + "attn2.to_k", t + "attn2.to_v"], False),
            (x + "attn.ln_q", [t + "attn.norm_q"], False), (x + "attn.ln_k", [t + "attn.norm_k"], False),
            (c + "attn.ln_q", [t + "attn.norm_added_q"], False), (c + "attn.ln_k", [t + "attn.norm_added_k"], False),
            (x + "attn2.ln_q", [t + "attn2.norm_q"], False), (x + "attn2.ln_k", [t + "attn2.norm_k"], False),
            (x + "attn.proj", [t + "attn.to_out.0"], False), (c + "attn.proj", [t + "attn.to_add_out"], False),
            (x + "attn2.proj", [t + "attn2.to_out.0"], False),
            (x + "adaLN_modulation.1", [t + "norm1.linear"], False),
            (c + "adaLN_modulation.1", [t + "norm1_context.linear"], i == n_layers - 1),
            (x + "mlp.fc1", [t + "ff.net.0.proj"], False), (x + "mlp.fc2", [t + "ff.net.2"], False),
            (c + "mlp.fc1", [t + "ff_context.net.0.proj"], False), (c + "mlp.fc2", [t + "ff_context.net.2"], False),
        ]  # fmt: skip
    return out


def _hv_groups(n_double: int, n_single: int, n_refiner: int) -> list[tuple[str, list[str], bool]]:
    out = [
        ("img_in.proj", ["x_embedder.proj"], False), ("txt_in.input_embedder", ["context_embedder.proj_in"], False),
        ("txt_in.t_embedder.mlp.0", ["context_embedder.time_text_embed.timestep_embedder.linear_1"], False),
        ("txt_in.t_embedder.mlp.2", ["context_embedder.time_text_embed.timestep_embedder.linear_2"], False),
        ("txt_in.c_embedder.linear_1", ["context_embedder.time_text_embed.text_embedder.linear_1"], False),
        ("txt_in.c_embedder.linear_2", ["context_embedder.time_text_embed.text_embedder.linear_2"], False),
        ("time_in.mlp.0", ["time_text_embed.timestep_embedder.linear_1"], False),
        ("time_in.mlp.2", ["time_text_embed.timestep_embedder.linear_2"], False),
        ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"], False),
        ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], False),
        ("guidance_in.mlp.0", ["time_text_embed.guidance_embedder.linear_1"], False),
        ("guidance_in.mlp.2", ["time_text_embed.guidance_embedder.linear_2"], False),
        ("final_layer.linear", ["proj_out"], False), ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True),
    ]  # fmt: skip
    for i in range(n_refiner):
        o, d = f"txt_in.individual_token_refiner.blocks.{i}.", f"context_embedder.token_refiner.refiner_blocks.{i}."
        out += [
            (o + "self_attn_qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], False),
            (o + "self_attn_proj", [d + "attn.to_out.0"], False), (o + "mlp.fc1", [d + "ff.net.0.proj"], False),
            (o + "mlp.fc2", [d + "ff.net.2"], False), (o + "adaLN_modulation.1", [d + "norm_out.linear"], False),
            (o + "norm1", [d + "norm1"], False), (o + "norm2", [d + "norm2"], False),
        ]  # fmt: skip
    for i in range(n_double):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        out += [
            (o + "img_attn_qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], False),
            (o + "txt_attn_qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], False),
            (o + "img_attn_q_norm", [d + "attn.norm_q"], False), (o + "img_attn_k_norm", [d + "attn.norm_k"], False),
            (o + "txt_attn_q_norm", [d + "attn.norm_added_q"], False),
            (o + "txt_attn_k_norm", [d + "attn.norm_added_k"], False),
            (o + "img_attn_proj", [d + "attn.to_out.0"], False), (o + "txt_attn_proj", [d + "attn.to_add_out"], False),
            (o + "img_mlp.fc1", [d + "ff.net.0.proj"], False), (o + "img_mlp.fc2", [d + "ff.net.2"], False),
            (o + "txt_mlp.fc1", [d + "ff_context.net.0.proj"], False),
            (o + "txt_mlp.fc2", [d + "ff_context.net.2"], False),
            (o + "img_mod.linear", [d + "norm1.linear"], False),
            (o + "txt_mod.linear", [d + "norm1_context.linear"], False),
        ]  # fmt: skip
    for i in range(n_single):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        out += [
            (o + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"], False),
            (o + "linear2", [d + "proj_out"], False), (o + "modulation.linear", [d + "norm.linear"], False),
            (o + "q_norm", [d + "attn.norm_q"], False), (o + "k_norm", [d + "attn.norm_k"], False),
        ]  # fmt: skip
    return out


@dataclass(frozen=True)
class Fused:
    name: str  # sd3 | hunyuan_video
    pipeline: str
    transformer: str
    config: dict

    def model(self, seed: int = 0) -> Any:
        import diffusers

        torch.manual_seed(seed)
        model = getattr(diffusers, self.transformer)(**self.config).eval()
        with torch.no_grad():  # diffusers zero-initializes some layers: random everywhere, so every module matters
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        return model

    def groups(self) -> list[tuple[str, list[str], bool]]:
        c = self.config
        if self.name == "sd3":
            return _sd3_groups(c["num_layers"])
        return _hv_groups(c["num_layers"], c["num_single_layers"], c["num_refiner_layers"])

    def to_original(self, state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
        """A diffusers state dict in the original layout (fused tensors concatenated, swapped halves swapped)."""
        out, used = {}, set()
        if "pos_embed.pos_embed" in state:
            out[prefix + "pos_embed"] = state["pos_embed.pos_embed"].clone()
            used.add("pos_embed.pos_embed")
        for orig, diffs, swapped in self.groups():
            for suffix in ("weight", "bias"):
                keys = [f"{d}.{suffix}" for d in diffs]
                if all(k in state for k in keys):
                    t = torch.cat([state[k] for k in keys])
                    out[f"{prefix}{orig}.{suffix}"] = _swap(t) if swapped else t
                    used.update(keys)
        left = sorted(set(state) - used)
        assert not left, left
        return out

    def from_original(self, state: dict) -> dict[str, torch.Tensor]:
        """The hand inverse of :meth:`to_original` (diffusers' own converters are checked against it)."""
        state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
        out = {}
        if "pos_embed" in state:
            out["pos_embed.pos_embed"] = state["pos_embed"]
        d = self.config["attention_head_dim"] * self.config["num_attention_heads"]
        for orig, diffs, swapped in self.groups():
            for suffix in ("weight", "bias"):
                t = state.get(f"{orig}.{suffix}")
                if t is None:
                    continue
                t = _swap(t) if swapped else t
                sizes = [d, d, d, t.shape[0] - 3 * d] if len(diffs) == 4 else [t.shape[0] // len(diffs)] * len(diffs)
                for name, piece in zip(diffs, torch.split(t, sizes), strict=True):
                    out[f"{name}.{suffix}"] = piece.contiguous()
        return out

    def forward(self, model: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            if self.name == "sd3":
                return model(hidden_states=torch.randn(1, 4, 4, 4, generator=g),
                             encoder_hidden_states=torch.randn(1, 3, 12, generator=g),
                             pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([400]),
                             return_dict=False)[0]  # fmt: skip
            return model(hidden_states=torch.randn(1, 4, 1, 4, 4, generator=g), timestep=torch.tensor([400]),
                         encoder_hidden_states=torch.randn(1, 3, 12, generator=g),
                         encoder_attention_mask=torch.ones(1, 3), pooled_projections=torch.randn(1, 8, generator=g),
                         guidance=torch.tensor([3500.0]), return_dict=False)[0]  # fmt: skip

    def save_pipeline(self, model: Any, folder: Path) -> Path:
        folder.mkdir(parents=True)
        model.save_pretrained(folder / "transformer")
        index = {"_class_name": self.pipeline, "transformer": ["diffusers", self.transformer]}
        (folder / "model_index.json").write_text(json.dumps(index))
        return folder

    def linears(self, model: Any) -> dict[str, tuple[int, int]]:
        """Original module name -> (out, in) of every 2-D original weight that is a Linear (no norm, no conv)."""
        state = self.to_original(model.state_dict())
        return {k[: -len(".weight")]: tuple(v.shape) for k, v in state.items()
                if k.endswith(".weight") and v.ndim == 2}  # fmt: skip

    def lora(self, model: Any, layout: str, modules: list[str] | None = None, rank: int = 3, seed: int = 3,
             alphas: str = "some", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
        """A random LoRA on original ``modules`` (default every Linear) in ``layout``: ``kohya``, ``comfyui``
        (diffusion_model., lora_down/up), ``musubi-other`` (diffusion_model., lora_A/B, no alpha) or ``original``
        (bare, lora_A/B). Ranks and alphas differ per module; ``alphas``: ``some`` (every third has none), ``all``,
        ``none``."""
        g = torch.Generator().manual_seed(seed)
        shapes = self.linears(model)
        out = {}
        for i, name in enumerate(modules or list(shapes)):
            o, n = shapes[name]
            r = rank + (i % 3)
            stem, down, up = {
                "kohya": ("lora_unet_" + name.replace(".", "_"), "lora_down", "lora_up"),
                "comfyui": ("diffusion_model." + name, "lora_down", "lora_up"),
                "musubi-other": ("diffusion_model." + name, "lora_A", "lora_B"),
                "original": (name, "lora_A", "lora_B"),
            }[layout]
            out[f"{stem}.{down}.weight"] = (torch.randn(r, n, generator=g) * 0.3).to(dtype)
            out[f"{stem}.{up}.weight"] = (torch.randn(o, r, generator=g) * 0.3).to(dtype)
            if alphas == "all" or (alphas == "some" and i % 3 != 2):
                out[f"{stem}.alpha"] = torch.tensor(float(1 + (i * 7) % 11))
        return out

    def trainer_merge(self, model: Any, lora: dict) -> dict[str, torch.Tensor]:
        """The trainers' rule (sd-scripts/musubi ``LoRAModule.merge_to``, ComfyUI ``comfy/lora.py``): W += alpha/rank ·
        up @ down on the original-named (fused) weight, no alpha = rank; back in diffusers' names."""
        state = self.to_original(model.state_dict())
        by_kohya = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in state if k.endswith(".weight")}
        stems = {k.rsplit(".", 2)[0] for k in lora if k.endswith(("lora_down.weight", "lora_A.weight"))}
        for stem in stems:
            down = lora.get(f"{stem}.lora_down.weight", lora.get(f"{stem}.lora_A.weight"))
            up = lora.get(f"{stem}.lora_up.weight", lora.get(f"{stem}.lora_B.weight"))
            alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else down.shape[0]
            key = by_kohya[stem] if stem.startswith("lora_unet_") else stem.removeprefix("diffusion_model.") + ".weight"
            state[key] = state[key] + alpha / down.shape[0] * up.float() @ down.float()
        return self.from_original(state)

    def diffusers_fused(self, model: Any, path: Path, adapter_name: str = "x") -> Any:
        """diffusers' own result: ``<Pipeline>.lora_state_dict`` + the transformer's ``load_lora_adapter``."""
        import diffusers

        pipe = getattr(diffusers, self.pipeline)
        state, metadata = pipe.lora_state_dict(str(path), return_lora_metadata=True)
        model.load_lora_adapter(state, adapter_name=adapter_name, prefix="transformer", metadata=metadata)
        return model


SD3 = Fused("sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel", SD3_CONFIG)
HV = Fused("hunyuan_video", "HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel", HV_CONFIG)
#: the modules musubi-tuner trains on HunyuanVideo by default (its blocks, modulations left out)
HV_MUSUBI = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn_qkv|attn_proj|mlp\.fc[12])"
                       r"|single_blocks\.\d+\.linear[12])$")

__all__ = ["HV", "HV_MUSUBI", "SD3", "Fused"]
