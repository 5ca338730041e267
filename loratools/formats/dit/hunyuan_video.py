"""HunyuanVideo (Tencent HunyuanVideo T2V and its fine-tunes): the original module names and the diffusers ones.

Tencent's ``hyvideo/modules/models.py`` names the modules that musubi-tuner (``networks/lora.py``: ``lora_unet_`` +
the path with ``.`` -> ``_``, LoRA on the Linears of every ``MMDoubleStreamBlock``/``MMSingleStreamBlock``, the
modulations left out by default), its ``convert_lora.py --target other`` (``diffusion_model.`` + the path,
``lora_A``/``lora_B``, alpha folded into both factors), ComfyUI (``diffusion_model.`` + the path) and the original
single files (bare or ``model.diffusion_model.``) use; diffusers' ``HunyuanVideoTransformer3DModel`` splits four
of them. The table follows diffusers' ``loaders/lora_conversion_utils.py`` (``_convert_hunyuan_video_lora_to_
diffusers``) and ``single_file_utils.convert_hunyuan_video_transformer_to_diffusers``:

- ``double_blocks.N.img_attn_qkv`` is ``transformer_blocks.N.attn.to_q/to_k/to_v`` (thirds of its rows), the
  ``txt_attn_qkv`` is ``add_q_proj/add_k_proj/add_v_proj``; the token refiner's
  ``txt_in.individual_token_refiner.blocks.N.self_attn_qkv`` is ``context_embedder.token_refiner.refiner_
  blocks.N.attn.to_q/to_k/to_v``;
- ``single_blocks.N.linear1`` is ``single_transformer_blocks.N.attn.to_q/to_k/to_v`` and ``proj_mlp``: rows
  ``[0, D)``, ``[D, 2D)``, ``[2D, 3D)``, ``[3D, end)`` with ``D`` its input width (diffusers hard-codes 3072,
  so its converters split nothing narrower; here ``D`` comes from the tensor);
- ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its two row halves swapped (diffusers'
  ``remap_norm_scale_shift_``); the token refiner's ``adaLN_modulation.1`` (two gates) keeps its order;
- every other module is one module under another name (below). The Conv3d ``img_in.proj`` carries no LoRA here.

diffusers 0.42 reads the ``diffusion_model.``/bare ``lora_A``/``lora_B`` names only (not musubi's kohya names),
splits ``linear1`` at 3072 whatever the width, and chunks a token-refiner ``self_attn_qkv`` lora_A into thirds of
its rank (the update it loads is not the file's); musubi-tuner's rule (W += alpha/rank · up·down on the fused
weight) is the reference there.
"""

from __future__ import annotations

from loratools.formats.dit.fused_table import FusedTable

FAMILY = "hunyuan_video"
DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp.fc1": ("ff.net.0.proj",),
    "img_mlp.fc2": ("ff.net.2",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",),
    "txt_mlp.fc2": ("ff_context.net.2",),
    "img_mod.linear": ("norm1.linear",),
    "txt_mod.linear": ("norm1_context.linear",),
}
SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.linear": ("norm.linear",),
}
REFINER: dict[str, tuple[str, ...]] = {
    "self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "self_attn_proj": ("attn.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
    "adaLN_modulation.1": ("norm_out.linear",),
}
TOP: dict[str, tuple[str, ...]] = {
    "txt_in.input_embedder": ("context_embedder.proj_in",),
    "txt_in.t_embedder.mlp.0": ("context_embedder.time_text_embed.timestep_embedder.linear_1",),
    "txt_in.t_embedder.mlp.2": ("context_embedder.time_text_embed.timestep_embedder.linear_2",),
    "txt_in.c_embedder.linear_1": ("context_embedder.time_text_embed.text_embedder.linear_1",),
    "txt_in.c_embedder.linear_2": ("context_embedder.time_text_embed.text_embedder.linear_2",),
    "time_in.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.mlp.0": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.mlp.2": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
TABLE = FusedTable(
    FAMILY=FAMILY, top=TOP, qkv_mlp="linear1",
    blocks=(("double_blocks", "transformer_blocks", DOUBLE), ("single_blocks", "single_transformer_blocks", SINGLE),
            ("txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner.refiner_blocks", REFINER)),
    probe=r"^(.*?)double_blocks\.\d+\.img_attn_qkv\.weight$",
    swap=lambda path, out, inp: path == "final_layer.adaLN_modulation.1",
    EXAMPLES="double_blocks.N.img_attn_qkv, double_blocks.N.img_mlp.fc1, single_blocks.N.linear1 ...",
)  # fmt: skip

__all__ = ["DOUBLE", "FAMILY", "REFINER", "SINGLE", "TABLE", "TOP"]
