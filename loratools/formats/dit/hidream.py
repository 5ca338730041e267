"""HiDream-I1 (``HiDreamImageTransformer2DModel``): one set of module names in every layout.

HiDream's own release is a diffusers model, and its LoRA files name modules as diffusers does under another prefix:
diffusers' ``_convert_non_diffusers_hidream_lora_to_diffusers`` only swaps ``diffusion_model.`` for
``transformer.``, and ``single_file_utils.convert_hidream_transformer_to_diffusers`` only strips
``model.diffusion_model.``. Only the kohya names need this table (their underscores are ambiguous:
``block_attn1_to_q_t``, ``ff_i_shared_experts_w1``). Nothing is fused or swapped.
"""

from __future__ import annotations

import re

from loratools.errors import UnsupportedError
from loratools.formats.dit.block_table import BlockTable

_ATTN = ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t")
_FF = [f"ff_i.shared_experts.w{i}" for i in (1, 2, 3)] + [f"ff_i.w{i}" for i in (1, 2, 3)] + \
    [f"ff_t.w{i}" for i in (1, 2, 3)] + [f"ff_i.experts.{e}.w{i}" for e in range(64) for i in (1, 2, 3)]  # fmt: skip
_INNER = ["block.adaLN_modulation.1"] + [f"block.attn1.{a}" for a in _ATTN] + [f"block.{f}" for f in _FF]
_TOP = ["t_embedder.timestep_embedder.linear_1", "t_embedder.timestep_embedder.linear_2",
        "p_embedder.pooled_embedder.linear_1", "p_embedder.pooled_embedder.linear_2", "x_embedder.proj",
        "final_layer.linear", "final_layer.adaLN_modulation.1"]  # fmt: skip
_TOP += [f"caption_projection.{i}.linear" for i in range(64)]

#: kohya text-encoder prefixes: no HiDream trainer writes them (sd-scripts and musubi-tuner have no HiDream network,
#: ai-toolkit writes diffusers names), and HiDream's four encoders (CLIP-L, CLIP-G, T5, Llama) would make any
#: sd-scripts-style numbering a guess
_TEXT = re.compile(r"^lora_te\d*_")


def refuse_text(path: object, keys: list[str]) -> None:
    """One line for a kohya HiDream file with text-encoder parts (which of the four encoders is unknown)."""
    key = next((k for k in keys if _TEXT.match(k)), None)
    if key is not None:
        raise UnsupportedError(
            f"{path}: {key!r}: a kohya text-encoder LoRA on HiDream, whose four text encoders (text_encoder CLIP-L, "
            "text_encoder_2 CLIP-G, text_encoder_3 T5, text_encoder_4 Llama) no HiDream trainer numbers in kohya "
            "names; loratools does not guess which one it is",
            hint="leave the text encoder out (loratools convert ADAPTER --exclude '^lora_te' -o OUT), or write it "
            "with diffusers names (text_encoder_N.<module>.lora_A.weight)",
            path=path,
        )


TABLE = BlockTable(
    FAMILY="hidream", blocks=("double_stream_blocks", "single_stream_blocks"),
    inner={p: (p,) for p in _INNER}, top={p: (p,) for p in _TOP},
    probe=r"^(.*?)double_stream_blocks\.\d+\.block\.attn1\.to_q\.weight$",
    EXAMPLES="double_stream_blocks.N.block.attn1.to_q, single_stream_blocks.N.block.ff_i.shared_experts.w1 ...",
)  # fmt: skip

__all__ = ["TABLE", "refuse_text"]
