"""LTX-Video (Lightricks LTX-Video 0.9.x, ``LTXVideoTransformer3DModel``): the original module names and diffusers'.

Lightricks' ``ltx_video/models/transformers/transformer3d.py`` already names its blocks as diffusers does
(``transformer_blocks.N.attn1.to_q``, ``attn2`` the cross-attention, ``ff.net.0.proj``/``ff.net.2``); ComfyUI and
musubi-style files put ``diffusion_model.`` / ``lora_unet_`` before them. diffusers'
``_convert_non_diffusers_ltxv_lora_to_diffusers`` only swaps ``diffusion_model.`` for ``transformer.``; its
single-file converter (``single_file_utils.convert_ltx_transformer_checkpoint_to_diffusers``) renames the
top-level modules: ``patchify_proj`` -> ``proj_in``, ``adaln_single`` -> ``time_embed`` (and the q/k norms, which
carry no LoRA). Nothing is fused or swapped.
"""

from __future__ import annotations

from loratools.formats.dit.renamed import RenamedTable

FAMILY = "ltx_video"
_BLOCK = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ff.net.0.proj", "ff.net.2")  # fmt: skip
TOP = {
    "patchify_proj": "proj_in",
    "adaln_single.linear": "time_embed.linear",
    "adaln_single.emb.timestep_embedder.linear_1": "time_embed.emb.timestep_embedder.linear_1",
    "adaln_single.emb.timestep_embedder.linear_2": "time_embed.emb.timestep_embedder.linear_2",
    "caption_projection.linear_1": "caption_projection.linear_1",
    "caption_projection.linear_2": "caption_projection.linear_2",
    "proj_out": "proj_out",
}
TABLE = RenamedTable(
    FAMILY="ltx_video", block="transformer_blocks", diff_block="transformer_blocks",
    inner={p: p for p in _BLOCK}, top=TOP, probe=r"^(.*?)transformer_blocks\.\d+\.attn2\.to_q\.weight$",
    EXAMPLES="transformer_blocks.N.attn1.to_q, transformer_blocks.N.ff.net.0.proj, patchify_proj ...",
)  # fmt: skip

__all__ = ["FAMILY", "TABLE", "TOP"]
