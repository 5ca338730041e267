"""SD3 / SD3.5 (Stability AI's MMDiT and MMDiT-X): the original module names and the diffusers ones.

Stability's ``sd3_impl``/``mmditx.py`` names the modules that sd-scripts (``networks/lora_sd3.py``: ``lora_unet_`` +
the path with ``.`` -> ``_``, LoRA on every Linear of each ``joint_blocks.N.x_block``/``context_block`` and, with
``emb_dims``, on the embedders and the final layer; ``lora_te1_``/``lora_te2_``/``lora_te3_`` for CLIP-L, CLIP-G,
T5), ComfyUI (``diffusion_model.`` + the path) and the original single files (bare or ``model.diffusion_model.``)
use; diffusers' ``SD3Transformer2DModel`` splits three of them. The table follows diffusers'
``single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers``:

- ``joint_blocks.N.x_block.attn.qkv`` is ``transformer_blocks.N.attn.to_q/to_k/to_v`` (thirds of its rows), the
  ``context_block.attn.qkv`` is ``add_q_proj/add_k_proj/add_v_proj`` and SD3.5's ``x_block.attn2.qkv`` is
  ``attn2.to_q/to_k/to_v``;
- ``final_layer.adaLN_modulation.1`` is ``norm_out.linear``, and the last block's ``context_block.adaLN_
  modulation.1`` (the one ``pre_only`` block: 2·D rows where the others have 6·D) is ``norm1_context.linear``,
  both with their two row halves swapped (shift, scale -> scale, shift; diffusers' ``swap_scale_shift``);
- every other module is one module under another name (below); ``x_embedder.proj`` (``pos_embed.proj``) is a
  Conv2d, which sd-scripts trains only with ``emb_dims`` (its LoRA: down k×k, up 1×1).

diffusers 0.42 has no converter for kohya SD3 files: ``StableDiffusion3Pipeline.load_lora_weights`` loads one
and applies nothing. sd-scripts' own rule (``networks/lora_flux.py`` ``LoRAModule.merge_to``: W += alpha/rank ·
up·down on the fused weight, no alpha = rank) is the reference there; its ``split_qkv`` option still saves the
fused layout (A's stacked, B block-diagonal), which is what this package writes too.
"""

from __future__ import annotations

from loratools.formats.dit.fused_table import FusedTable

FAMILY = "sd3"
#: original path inside ``joint_blocks.N`` -> diffusers parts inside ``transformer_blocks.N``
INNER: dict[str, tuple[str, ...]] = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
#: top-level original module -> diffusers module
TOP: dict[str, tuple[str, ...]] = {
    "context_embedder": ("context_embedder",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
    "x_embedder.proj": ("pos_embed.proj",),
}


def _swapped(path: str, out_rows: int, in_features: int) -> bool:
    if path == "final_layer.adaLN_modulation.1":
        return True
    return path.endswith(".context_block.adaLN_modulation.1") and out_rows == 2 * in_features


TABLE = FusedTable(
    FAMILY=FAMILY, blocks=(("joint_blocks", "transformer_blocks", INNER),), top=TOP,
    probe=r"^(.*?)joint_blocks\.\d+\.x_block\.attn\.qkv\.weight$", swap=_swapped, CONV=frozenset({"x_embedder.proj"}),
    EXAMPLES="joint_blocks.N.x_block.attn.qkv, joint_blocks.N.context_block.mlp.fc1, final_layer.linear ...",
)  # fmt: skip

__all__ = ["FAMILY", "INNER", "TABLE", "TOP"]
