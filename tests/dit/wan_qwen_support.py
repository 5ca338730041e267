"""Tiny random-weight Wan and Qwen-Image transformers, their original-layout single files, and LoRAs in each layout
their trainers write (musubi-tuner kohya names, ComfyUI/musubi ``diffusion_model.``, ai-toolkit, DiffSynth bare names,
diffusers ``transformer.``).

The diffusers -> Wan-AI names here are written out by hand as the inverse of diffusers'
``single_file_utils.convert_wan_transformer_to_diffusers`` (test_wan checks that diffusers' converter takes them
back exactly), independently of ``loratools/formats/dit/wan.py``. Qwen-Image names are diffusers' in every layout.
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

WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=12,
    freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    image_dim=8, added_kv_proj_dim=16,
)  # fmt: skip  (image_dim: the I2V model, with the k_img/v_img projections and the image embedder)
QWEN_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
)  # fmt: skip

#: diffusers -> Wan-AI, applied in order to a diffusers tensor name (the inverse of diffusers' rename table)
_WAN_BACK = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."),
    (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."),
)  # fmt: skip


def wan_name(diffusers_key: str) -> str:
    """The Wan-AI name of a diffusers WanTransformer3DModel tensor or module name."""
    key = diffusers_key + "."
    if key.startswith("proj_out."):
        key = "head.head." + key[len("proj_out.") :]
    if key == "scale_shift_table.":
        key = "head.modulation."
    key = re.sub(r"^blocks\.(\d+)\.scale_shift_table\.$", r"blocks.\1.modulation.", key)
    for a, b in _WAN_BACK:
        key = key.replace(a, b)
    return key[:-1]


@dataclass(frozen=True)
class Family:
    name: str  # wan | qwen_image
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

    def original(self, diffusers_name: str) -> str:
        return wan_name(diffusers_name) if self.name == "wan" else diffusers_name

    def to_original(self, state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + self.original(k): v.clone() for k, v in state.items()}

    def from_original(self, state: dict) -> dict[str, torch.Tensor]:
        """diffusers' own conversion of an original-layout single file (Wan: convert_wan_transformer_to_diffusers;
        Qwen-Image: the same names, the prefix stripped)."""
        if self.name == "wan":
            from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

            return convert_wan_transformer_to_diffusers(dict(state))
        return {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}

    def forward(self, model: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            if self.name == "wan":
                image = torch.randn(1, 2, 8, generator=g)
                return model(hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g), timestep=torch.tensor([500]),
                             encoder_hidden_states=torch.randn(1, 3, 12, generator=g),
                             encoder_hidden_states_image=image, return_dict=False)[0]  # fmt: skip
            return model(hidden_states=torch.randn(1, 4, 16, generator=g),
                         encoder_hidden_states=torch.randn(1, 3, 12, generator=g),
                         encoder_hidden_states_mask=torch.ones(1, 3), timestep=torch.tensor([0.4]),
                         img_shapes=[(1, 2, 2)], return_dict=False)[0]  # fmt: skip

    def save_pipeline(self, model: Any, folder: Path, second: Any = None) -> Path:
        """model_index.json + transformer/ (+ transformer_2/ for a Wan2.2 A14B-style pipeline)."""
        folder.mkdir(parents=True)
        model.save_pretrained(folder / "transformer")
        index = {"_class_name": self.pipeline, "transformer": ["diffusers", self.transformer]}
        if second is not None:
            second.save_pretrained(folder / "transformer_2")
            index["transformer_2"] = ["diffusers", self.transformer]
        (folder / "model_index.json").write_text(json.dumps(index))
        return folder

    def linears(self, model: Any) -> dict[str, tuple[int, int]]:
        """diffusers module name -> (out, in) of every Linear of the transformer."""
        return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def lora(self, model: Any, layout: str, modules: list[str] | None = None, rank: int = 3, seed: int = 3,
             alphas: str = "some", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
        """A random LoRA on ``modules`` (diffusers names; default every Linear) in ``layout``: ``kohya``
        (lora_unet_ + underscores, lora_down/up), ``comfyui`` (diffusion_model., lora_down/up), ``aitoolkit``
        (diffusion_model., lora_A/B), ``original`` (bare original names, lora_A/B), ``diffusers`` (transformer.,
        lora_A/B). Ranks and alphas differ per module; ``alphas``: ``some`` (every third module has none), ``all``,
        ``none``, ``blocks`` (as ``some`` inside the blocks, none on the top-level modules)."""
        g = torch.Generator().manual_seed(seed)
        shapes = self.linears(model)
        out = {}
        for i, name in enumerate(modules or list(shapes)):
            o, n = shapes[name]
            r = rank + (i % 3)
            orig = self.original(name)
            stem, down, up = {
                "kohya": ("lora_unet_" + orig.replace(".", "_"), "lora_down", "lora_up"),
                "comfyui": ("diffusion_model." + orig, "lora_down", "lora_up"),
                "aitoolkit": ("diffusion_model." + orig, "lora_A", "lora_B"),
                "original": (orig, "lora_A", "lora_B"),
                "diffusers": ("transformer." + name, "lora_A", "lora_B"),
            }[layout]
            out[f"{stem}.{down}.weight"] = (torch.randn(r, n, generator=g) * 0.3).to(dtype)
            out[f"{stem}.{up}.weight"] = (torch.randn(o, r, generator=g) * 0.3).to(dtype)
            in_block = name.startswith(("blocks.", "transformer_blocks."))
            if alphas == "all" or (alphas in ("some", "blocks") and i % 3 != 2 and (in_block or alphas == "some")):
                out[f"{stem}.alpha"] = torch.tensor(float(1 + (i * 7) % 11))
        return out

    def trainer_merge(self, model: Any, lora: dict) -> dict[str, torch.Tensor]:
        """The trainers' rule (musubi-tuner ``networks/lora.py`` merge_to, ComfyUI ``comfy/lora.py``): W += alpha/rank
        · up @ down on the original-named weight (no alpha: alpha = rank), then back in diffusers' names."""
        state = self.to_original(model.state_dict())
        by_kohya = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in state if k.endswith(".weight")}
        stems = {k.rsplit(".", 2)[0] for k in lora if k.endswith(("lora_down.weight", "lora_A.weight"))}
        for stem in stems:
            down = lora.get(f"{stem}.lora_down.weight", lora.get(f"{stem}.lora_A.weight"))
            up = lora.get(f"{stem}.lora_up.weight", lora.get(f"{stem}.lora_B.weight"))
            alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else down.shape[0]
            if stem.startswith("lora_unet_"):
                key = by_kohya[stem]
            elif stem.startswith("transformer."):
                key = self.original(stem.removeprefix("transformer.")) + ".weight"
            else:
                key = stem.removeprefix("diffusion_model.") + ".weight"
            state[key] = state[key] + alpha / down.shape[0] * up.float() @ down.float()
        return self.from_original(state)

    def diffusers_fused(self, model: Any, path: Path, adapter_name: str = "x") -> Any:
        """diffusers' own result: ``<Pipeline>.lora_state_dict`` + the transformer's ``load_lora_adapter`` (what
        ``load_lora_weights`` runs); the caller fuses."""
        import diffusers

        pipe = getattr(diffusers, self.pipeline)
        state, metadata = pipe.lora_state_dict(str(path), return_lora_metadata=True)
        model.load_lora_adapter(state, adapter_name=adapter_name, prefix="transformer", metadata=metadata)
        return model


WAN = Family("wan", "WanPipeline", "WanTransformer3DModel", WAN_CONFIG)
QWEN = Family("qwen_image", "QwenImagePipeline", "QwenImageTransformer2DModel", QWEN_CONFIG)


def fused(model: Any) -> dict[str, torch.Tensor]:
    model.fuse_lora()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def close(ours: dict, theirs: dict, atol: float = 1e-5) -> float:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    assert worst <= atol, worst
    return worst


__all__ = ["QWEN", "WAN", "Family", "close", "fused", "wan_name"]
