"""Tiny random-weight Z-Image, Lumina2, Chroma and HiDream transformers, their original-layout single files and
LoRAs in the layouts their trainers write.

The original <-> diffusers names are written out here by hand as the inverse of diffusers' single-file converters
(``convert_z_image_transformer_checkpoint_to_diffusers``, ``convert_lumina2_to_diffusers``,
``convert_chroma_transformer_checkpoint_to_diffusers``, ``convert_hidream_transformer_to_diffusers``),
independently of ``loratools/formats/dit``; test_nextdit checks them against those converters (at full width on
the meta device where a converter hard-codes the width).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore", category=FutureWarning)

Z_CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
                n_heads=4, n_kv_heads=4, cap_feat_dim=12, axes_dims=[2, 2, 4], axes_lens=[64, 32, 32])  # fmt: skip
L_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
                num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(2, 2, 4),
                axes_lens=(32, 32, 32), cap_feat_dim=12)  # fmt: skip  (2 of 4 heads for key/value: GQA)
C_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                approximator_hidden_dim=16, approximator_layers=2)  # fmt: skip
H_CONFIG = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                num_attention_heads=2, caption_channels=[8, 6], text_emb_dim=10, num_routed_experts=2,
                num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16),
                llama_layers=[0, 1])  # fmt: skip

_BLOCK = r"^((?:layers|noise_refiner|context_refiner)\.\d+)\."


def _z_native(name: str) -> tuple[str, int]:
    """(ComfyUI/NextDiT module, part index) of a ZImageTransformer2DModel module (q/k/v: thirds of attention.qkv)."""
    m = re.match(_BLOCK + r"attention\.to_([qkv])$", name)
    if m:
        return f"{m.group(1)}.attention.qkv", "qkv".index(m.group(2))
    name = re.sub(r"\.attention\.to_out\.0$", ".attention.out", name)
    name = name.replace("all_x_embedder.2-1", "x_embedder").replace("all_final_layer.2-1.", "final_layer.")
    return name, 0


_L_TOP = {"x_embedder": "x_embedder", "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
          "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
          "time_caption_embed.caption_embedder.1": "cap_embedder.1",
          "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear"}  # fmt: skip
_L_INNER = {"attn.to_out.0": "attention.out", "feed_forward.linear_1": "feed_forward.w1",
            "feed_forward.linear_2": "feed_forward.w2", "feed_forward.linear_3": "feed_forward.w3",
            "norm1.linear": "adaLN_modulation.1"}  # fmt: skip


def _l_native(name: str) -> tuple[str, int]:
    if name in _L_TOP:
        return _L_TOP[name], 0
    m = re.match(_BLOCK + r"(.+)$", name)
    assert m, name
    qkv = re.match(r"attn\.to_([qkv])$", m.group(2))
    if qkv:
        return f"{m.group(1)}.attention.qkv", "qkv".index(qkv.group(1))
    return f"{m.group(1)}.{_L_INNER[m.group(2)]}", 0


_C_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
_C_DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
             "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
             "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", 0),
             "attn.to_add_out": ("txt_attn.proj", 0), "ff.net.0.proj": ("img_mlp.0", 0), "ff.net.2": ("img_mlp.2", 0),
             "ff_context.net.0.proj": ("txt_mlp.0", 0), "ff_context.net.2": ("txt_mlp.2", 0)}  # fmt: skip
_C_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
             "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0)}  # fmt: skip


def _c_native(name: str) -> tuple[str, int]:
    if name in _C_TOP:
        return _C_TOP[name], 0
    m = re.match(r"^distilled_guidance_layer\.layers\.(\d+)\.linear_([12])$", name)
    if m:
        return f"distilled_guidance_layer.layers.{m.group(1)}.{'in_layer' if m.group(2) == '1' else 'out_layer'}", 0
    if name.startswith("distilled_guidance_layer."):
        return name, 0
    m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", name)
    table, block = (_C_DOUBLE, "double_blocks") if m.group(1) == "transformer_blocks" else (_C_SINGLE, "single_blocks")
    inner, part = table[m.group(3)]
    return f"{block}.{m.group(2)}.{inner}", part


def _forward(name: str, model: Any) -> torch.Tensor:
    """The transformer's output on fixed random inputs (the same on every call)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        if name == "z_image":
            return model([r(4, 1, 4, 4)], torch.tensor([0.5]), [r(3, 12)], return_dict=False)[0][0]
        if name == "lumina2":
            return model(r(1, 4, 4, 4), torch.tensor([0.5]), r(1, 3, 12), torch.ones(1, 3, dtype=torch.bool),
                         return_dict=False)[0]  # fmt: skip
        if name == "chroma":
            return model(hidden_states=r(1, 6, 4), encoder_hidden_states=r(1, 3, 12), timestep=torch.tensor([0.4]),
                         img_ids=r(6, 3), txt_ids=r(3, 3), return_dict=False)[0]  # fmt: skip
        return model(hidden_states=r(1, 4, 4, 4), timesteps=torch.tensor([500]), encoder_hidden_states_t5=r(1, 3, 8),
                     encoder_hidden_states_llama3=r(2, 1, 3, 6), pooled_embeds=r(1, 10),
                     return_dict=False)[0]  # fmt: skip


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str
    transformer: str
    config: dict
    native: Any  # diffusers module -> (original module, part index)
    split_files: bool  # the trainers' files hold diffusers' names (Z-Image, HiDream), else the original fused ones
    probe: str = field(default="")

    def model(self, seed: int = 0) -> Any:
        import diffusers

        torch.manual_seed(seed)
        model = getattr(diffusers, self.transformer)(**self.config).eval()
        with torch.no_grad():  # random everywhere (diffusers zero-initializes some layers): every module matters
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        return model

    def forward(self, model: Any) -> torch.Tensor:
        return _forward(self.name, model)

    def linears(self, model: Any) -> dict[str, tuple[int, int]]:
        return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def groups(self, model: Any) -> dict[str, list[str]]:
        """original module -> its diffusers parts in row order"""
        out: dict[str, dict[int, str]] = {}
        for n in self.linears(model):
            orig, part = self.native(n)
            out.setdefault(orig, {})[part] = n
        return {k: [v[i] for i in sorted(v)] for k, v in out.items()}

    def to_native(self, state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
        """The original-layout single file of a diffusers state dict (fused weights: parts stacked by rows; the
        tensors of other modules keep their names)."""
        linears = set(self.linears(self.model()))
        out, fused = {}, {}
        for k, v in state.items():
            mod, _, leaf = k.rpartition(".")
            if mod in linears:
                orig, part = self.native(mod)
                fused.setdefault(f"{orig}.{leaf}", {})[part] = v
            else:
                out[k] = v.clone()
        for k, parts in fused.items():
            out[k] = torch.cat([parts[i] for i in sorted(parts)]).clone()
        return {prefix + k: v for k, v in out.items()}

    def from_native(self, native: dict, model: Any) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`to_native` (row splits from the model's shapes)."""
        state = dict(model.state_dict())
        shapes = self.linears(model)
        out = {k: v for k, v in native.items()}
        result = {}
        for k in state:
            mod, _, leaf = k.rpartition(".")
            if mod in shapes and leaf in ("weight", "bias"):
                orig, part = self.native(mod)
                parts = self.groups(model)[orig]
                start = sum(shapes[p][0] for p in parts[:part])
                result[k] = out[f"{orig}.{leaf}"][start : start + shapes[mod][0]]
            else:
                result[k] = out[k]
        return result

    def file_name(self, diffusers_name: str) -> str:
        return diffusers_name if self.split_files else self.native(diffusers_name)[0]

    def lora(self, model: Any, layout: str, rank: int = 3, seed: int = 3, alphas: str = "some",
             fused: bool | None = None, modules: list[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """A random LoRA in ``layout`` (kohya | comfyui | aitoolkit | original | diffusers) on every module (or on
        ``modules``, original names when fused, else diffusers names); ``fused``: one LoRA per original module
        (default: the family's trainers' habit). Ranks and alphas differ per module; ``alphas``: some | all | none."""
        g = torch.Generator().manual_seed(seed)
        shapes = self.linears(model)
        fused = (not self.split_files) if fused is None else fused
        if layout == "diffusers":
            fused = False
        if fused:
            units = {o: (sum(shapes[p][0] for p in ps), shapes[ps[0]][1]) for o, ps in self.groups(model).items()}
        else:
            units = {(n if layout == "diffusers" else self.file_name(n)): s for n, s in shapes.items()}
        out = {}
        for i, name in enumerate(modules or list(units)):
            o, n = units[name]
            r = rank + (i % 3)
            stem, down, up = {
                "kohya": ("lora_unet_" + name.replace(".", "_"), "lora_down", "lora_up"),
                "comfyui": ("diffusion_model." + name, "lora_down", "lora_up"),
                "aitoolkit": ("diffusion_model." + name, "lora_A", "lora_B"),
                "original": (name, "lora_A", "lora_B"),
                "diffusers": ("transformer." + name, "lora_A", "lora_B"),
            }[layout]
            out[f"{stem}.{down}.weight"] = torch.randn(r, n, generator=g) * 0.3
            out[f"{stem}.{up}.weight"] = torch.randn(o, r, generator=g) * 0.3
            if alphas == "all" or (alphas == "some" and i % 3 != 2):
                out[f"{stem}.alpha"] = torch.tensor(float(1 + (i * 7) % 11))
        return out

    def trainer_merge(self, model: Any, lora: dict) -> dict[str, torch.Tensor]:
        """The trainers' rule (ComfyUI ``comfy/lora.py``, musubi-tuner / sd-scripts ``merge_to``): W += alpha/rank ·
        up @ down on the named weight (no alpha: alpha = rank; a diffusers-named part: its rows of the fused one),
        on the original-layout state, then back in diffusers' names."""
        state = self.to_native(model.state_dict())
        shapes = self.linears(model)
        names = {**{o: (o, None) for o in self.groups(model)}, **{n: (n, n) for n in shapes}}
        by_kohya = {k.replace(".", "_"): k for k in names}
        stems = {k.rsplit(".", 2)[0] for k in lora if k.endswith(("lora_down.weight", "lora_A.weight"))}
        for stem in stems:
            down = lora.get(f"{stem}.lora_down.weight", lora.get(f"{stem}.lora_A.weight"))
            up = lora.get(f"{stem}.lora_up.weight", lora.get(f"{stem}.lora_B.weight"))
            alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else down.shape[0]
            bare = re.sub(r"^(lora_unet_|diffusion_model\.|transformer\.)", "", stem)
            name = by_kohya[bare] if stem.startswith("lora_unet_") else bare
            delta = alpha / down.shape[0] * up.float() @ down.float()
            if name in shapes and self.native(name)[0] != name:  # a diffusers-named part of a fused weight
                orig, part = self.native(name)
                parts = self.groups(model)[orig]
                start = sum(shapes[p][0] for p in parts[:part])
                w = state[f"{orig}.weight"].clone()
                w[start : start + delta.shape[0]] += delta
                state[f"{orig}.weight"] = w
            else:
                state[f"{self.native(name)[0] if name in shapes else name}.weight"] += delta
        return self.from_native(state, model)

    def diffusers_fused(self, model: Any, path: Path, adapter_name: str = "x") -> Any:
        """diffusers' own result: ``<Pipeline>.lora_state_dict`` + the transformer's ``load_lora_adapter``."""
        import diffusers

        pipe = getattr(diffusers, self.pipeline)
        state, metadata = pipe.lora_state_dict(str(path), return_lora_metadata=True)
        if self.name == "chroma":  # Flux's loader: kohya alphas come back as network_alphas
            state, alphas, metadata = pipe.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
            pipe.load_lora_into_transformer(state, network_alphas=alphas, transformer=model,
                                            adapter_name=adapter_name, metadata=metadata)  # fmt: skip
            return model
        model.load_lora_adapter(state, adapter_name=adapter_name, prefix="transformer", metadata=metadata)
        return model

    def save_pipeline(self, model: Any, folder: Path) -> Path:
        folder.mkdir(parents=True)
        model.save_pretrained(folder / "transformer")
        index = {"_class_name": self.pipeline, "transformer": ["diffusers", self.transformer]}
        (folder / "model_index.json").write_text(json.dumps(index))
        return folder


Z_IMAGE = Family("z_image", "ZImagePipeline", "ZImageTransformer2DModel", Z_CONFIG, _z_native, True)
LUMINA2 = Family("lumina2", "Lumina2Pipeline", "Lumina2Transformer2DModel", L_CONFIG, _l_native, False)
CHROMA = Family("chroma", "ChromaPipeline", "ChromaTransformer2DModel", C_CONFIG, _c_native, False)
HIDREAM = Family("hidream", "HiDreamImagePipeline", "HiDreamImageTransformer2DModel", H_CONFIG,
                 lambda n: (n, 0), True)  # fmt: skip
FAMILIES = {f.name: f for f in (Z_IMAGE, LUMINA2, CHROMA, HIDREAM)}


def fused(model: Any) -> dict[str, torch.Tensor]:
    model.fuse_lora()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def close(ours: dict, theirs: dict, atol: float = 1e-5) -> float:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    assert worst <= atol, worst
    return worst


__all__ = ["CHROMA", "FAMILIES", "HIDREAM", "LUMINA2", "Z_IMAGE", "Family", "close", "fused"]
