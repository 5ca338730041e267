"""Qwen-Image (Qwen-Image, Qwen-Image-Edit and their fine-tunes): one set of module names in every layout.

Qwen's own release is diffusers' ``QwenImageTransformer2DModel``, and every trainer names its modules as it does:
musubi-tuner ``lora_unet_`` + the path with ``.`` -> ``_`` (its ``convert_lora.py`` lists the names,
``QWEN_IMAGE_KEYS``), ai-toolkit ``diffusion_model.`` + the path with ``lora_A``/``lora_B`` and no alpha
(``extensions_built_in/diffusion_models/qwen_image``: ``convert_lora_weights_before_save`` swaps ``transformer.``
for ``diffusion_model.``), DiffSynth-Studio the bare path, ComfyUI ``diffusion_model.`` + the path; the original
single files are bare or ``model.diffusion_model.``. Only the kohya names need a table: their underscores are
ambiguous (``img_mlp_net_0_proj``), and diffusers' ``_convert_non_diffusers_qwen_lora_to_diffusers`` protects
the same n-grams this table spells out. Nothing is fused or swapped (``norm_out.linear`` is scale, shift in every
layout).
"""

from __future__ import annotations

from loratools.formats.dit.renamed import RenamedTable

FAMILY = "qwen_image"
_BLOCK = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)  # fmt: skip
_TOP = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2")  # fmt: skip
TABLE = RenamedTable(
    FAMILY="qwen_image", block="transformer_blocks", diff_block="transformer_blocks",
    inner={p: p for p in _BLOCK}, top={p: p for p in _TOP},
    probe=r"^(.*?)transformer_blocks\.\d+\.img_mod\.1\.weight$",
    EXAMPLES="transformer_blocks.N.attn.to_q, transformer_blocks.N.img_mlp.net.0.proj, img_in ...",
)  # fmt: skip

__all__ = ["FAMILY", "TABLE"]
