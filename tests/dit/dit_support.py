"""Tiny random-weight Flux transformers, their original-layout (BFL) single files and LoRAs in each trainer layout.

The BFL <-> diffusers weight mapping here is written out by hand from diffusers'
``single_file_utils.convert_flux_transformer_checkpoint_to_diffusers`` (which hard-codes the 3072 width, so it
cannot convert a tiny model itself), independently of ``loratools/formats/dit/flux.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)

D = 16  # hidden width (2 heads of 8)
CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=12, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)  # fmt: skip
#: every BFL module a kohya Flux LoRA may train in the tiny model (block 0 of each kind)
BFL_MODULES = (
    "double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
    "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
    "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2", "double_blocks.0.img_mod.lin",
    "double_blocks.0.txt_mod.lin", "single_blocks.0.linear1", "single_blocks.0.linear2",
    "single_blocks.0.modulation.lin", "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
    "vector_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)  # fmt: skip


def transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():  # diffusers zero-initializes some layers: random everywhere, so every module matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    img, txt = 6, 3
    return {
        "hidden_states": torch.randn(1, img, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, txt, 12, generator=g),
        "pooled_projections": torch.randn(1, 8, generator=g),
        "timestep": torch.tensor([0.4]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.randn(img, 3, generator=g),
        "txt_ids": torch.randn(txt, 3, generator=g),
    }


def forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(), return_dict=False)[0]


def save_pipeline(model, folder: Path) -> Path:
    """A pipeline folder as loratools reads one: model_index.json + transformer/ (no text encoders needed)."""
    folder.mkdir(parents=True)
    model.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
    }))  # fmt: skip
    return folder


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


#: (BFL tensor stem, diffusers stems concatenated in row order); swapped: norm_out
_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
    "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.norm.query_norm": ["attn.norm_q"], "img_attn.norm.key_norm": ["attn.norm_k"],
    "txt_attn.norm.query_norm": ["attn.norm_added_q"], "txt_attn.norm.key_norm": ["attn.norm_added_k"],
}  # fmt: skip
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"], "norm.query_norm": ["attn.norm_q"], "norm.key_norm": ["attn.norm_k"],
}  # fmt: skip
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}  # fmt: skip


def _pairs(state: dict) -> list[tuple[str, list[str], bool]]:
    """(BFL stem, diffusers stems, swapped) for every tensor group of the tiny model."""
    out = []
    for bfl, diff in _TOP.items():
        out.append((bfl, [diff], bfl == "final_layer.adaLN_modulation.1"))
    for bfl, diffs in _DOUBLE.items():
        out.append((f"double_blocks.0.{bfl}", [f"transformer_blocks.0.{d}" for d in diffs], False))
    for bfl, diffs in _SINGLE.items():
        out.append((f"single_blocks.0.{bfl}", [f"single_transformer_blocks.0.{d}" for d in diffs], False))
    return out


def _norm_suffix(bfl: str) -> tuple[str, str]:
    return ("scale", "weight") if bfl.endswith("_norm") else ("weight", "weight")


def to_bfl(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Flux state dict in the original layout (``prefix``: "" or ``model.diffusion_model.``)."""
    out, used = {}, set()
    for bfl, diffs, swapped in _pairs(state):
        for b_suf, d_suf in (_norm_suffix(bfl), ("bias", "bias")):
            keys = [f"{d}.{d_suf}" for d in diffs]
            if not all(k in state for k in keys):
                continue
            t = torch.cat([state[k] for k in keys])
            out[f"{prefix}{bfl}.{b_suf}"] = _swap(t) if swapped else t
            used.update(keys)
    left = sorted(set(state) - used)
    assert not left, left
    return out


def from_bfl(bfl_state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_bfl`."""
    out = {}
    for bfl, diffs, swapped in _pairs({}):
        for b_suf, d_suf in (_norm_suffix(bfl), ("bias", "bias")):
            key = f"{prefix}{bfl}.{b_suf}"
            if key not in bfl_state:
                continue
            t = bfl_state[key]
            t = _swap(t) if swapped else t
            sizes = [D, D, D, t.shape[0] - 3 * D] if len(diffs) == 4 else [t.shape[0] // len(diffs)] * len(diffs)
            for d, piece in zip(diffs, torch.split(t, sizes), strict=True):
                out[f"{d}.{d_suf}"] = piece.contiguous()
    return out


def module_shape(model, bfl: str) -> tuple[int, int]:
    """(out, in) of a BFL module in the tiny model."""
    state = model.state_dict()
    for b, diffs, _ in _pairs(state):
        if b == bfl:
            ws = [state[f"{d}.weight"] for d in diffs]
            return sum(w.shape[0] for w in ws), ws[0].shape[1]
    raise KeyError(bfl)


def kohya_flux(model, modules=BFL_MODULES, rank: int = 4, seed: int = 3, layout: str = "kohya",
               dtype=torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
    """A random LoRA in the kohya (``lora_unet_``), ComfyUI (``diffusion_model.``) or BFL (bare, lora_A/B)
    layout; every module has its own alpha (and the third has none: alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, bfl in enumerate(modules):
        o, n = module_shape(model, bfl)
        r = rank + (i % 3)
        if layout == "kohya":
            stem, down, up = "lora_unet_" + bfl.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif layout == "comfyui":
            stem, down, up = "diffusion_model." + bfl, "lora_down.weight", "lora_up.weight"
        else:
            stem, down, up = bfl, "lora_A.weight", "lora_B.weight"
        out[f"{stem}.{down}"] = (torch.randn(r, n, generator=g) * 0.3).to(dtype)
        out[f"{stem}.{up}"] = (torch.randn(o, r, generator=g) * 0.3).to(dtype)
        if i % 3 != 2:
            out[f"{stem}.alpha"] = torch.tensor(float(1 + (i * 7) % 11))
    return out


def diffusers_flux(model, rank: int = 4, seed: int = 5) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers/PEFT-layout LoRA on every Linear of the transformer (its own A per q/k/v), and the
    ``lora_adapter_metadata`` config giving each module its own alpha."""
    g = torch.Generator().manual_seed(seed)
    out, alphas, ranks = {}, {}, {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (name, lin) in enumerate(linears):
        r = rank + (i % 2)
        out[f"transformer.{name}.lora_A.weight"] = torch.randn(r, lin.in_features, generator=g) * 0.3
        out[f"transformer.{name}.lora_B.weight"] = torch.randn(lin.out_features, r, generator=g) * 0.3
        alphas[name], ranks[name] = float(2 + i % 5), r
    import re

    config = {
        "r": rank, "lora_alpha": 2.0, "target_modules": sorted(alphas),
        "rank_pattern": {f"^{re.escape(n)}$": r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {f"^{re.escape(n)}$": a for n, a in alphas.items() if a != 2.0},
        "peft_type": "LORA",
    }  # fmt: skip
    return out, config


def diffusers_fused(model, path, adapter_name: str = "x"):
    """diffusers' own result: ``FluxPipeline.lora_state_dict`` + ``load_lora_into_transformer`` + ``fuse_lora``
    (what ``FluxPipeline.load_lora_weights`` runs for the transformer); returns the fused model."""
    from diffusers import FluxPipeline

    state, alphas, metadata = FluxPipeline.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=model,
                                            adapter_name=adapter_name, metadata=metadata)  # fmt: skip
    return model


__all__ = ["BFL_MODULES", "CONFIG", "D", "diffusers_flux", "forward", "from_bfl", "kohya_flux", "save_pipeline",
           "to_bfl", "transformer"]  # fmt: skip
