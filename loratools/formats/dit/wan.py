"""Wan (Wan-AI Wan2.1 and Wan2.2: T2V, I2V, TI2V): the original module names and the diffusers ones.

Wan-AI's ``wan/modules/model.py`` names the modules that musubi-tuner (``lora_unet_`` + the path with ``.`` ->
``_``), ComfyUI (``diffusion_model.`` + the path), DiffSynth-Studio (the bare path) and the original checkpoints
(bare or ``model.diffusion_model.``) use; diffusers' ``WanTransformer3DModel`` renames every one of them and fuses
nothing. The table follows diffusers' ``loaders/lora_conversion_utils.py`` (``_convert_musubi_wan_lora_to_
diffusers``, ``_convert_non_diffusers_wan_lora_to_diffusers``) and ``single_file_utils.convert_wan_transformer_
to_diffusers``: ``self_attn``/``cross_attn`` are ``attn1``/``attn2`` with ``q, k, v, o`` -> ``to_q, to_k, to_v,
to_out.0`` and the I2V image keys ``k_img, v_img`` -> ``add_k_proj, add_v_proj``; ``ffn.0``/``ffn.2`` are
``ffn.net.0.proj``/``ffn.net.2``; the embedders and the head are below. The Conv3d ``patch_embedding`` and the
``modulation`` parameters carry no LoRA.

Wan2.2's A14B models are two transformers (high-noise ``transformer``, low-noise ``transformer_2`` in a diffusers
pipeline) with these same names: a LoRA trained for one of them merges into that one's folder.
"""

from __future__ import annotations

from loratools.formats.dit.renamed import RenamedTable

FAMILY = "wan"
#: Wan-AI path inside ``blocks.N`` -> diffusers path inside ``blocks.N``
INNER = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}  # fmt: skip
#: top-level Wan-AI module -> diffusers module
TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "head.head": "proj_out",
}
TABLE = RenamedTable(
    FAMILY="wan", block="blocks", diff_block="blocks", inner=INNER, top=TOP,
    probe=r"^(.*?)blocks\.\d+\.self_attn\.q\.weight$",
    EXAMPLES="blocks.N.self_attn.q, blocks.N.cross_attn.k_img, blocks.N.ffn.0, head.head ...",
)  # fmt: skip

__all__ = ["FAMILY", "INNER", "TABLE", "TOP"]
