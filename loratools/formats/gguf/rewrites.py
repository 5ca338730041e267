"""The per-architecture rewrites llama.cpp's HF converter applies to base weights, applied to LoRA factors.

``convert_hf_to_gguf.py`` (``conversion/llama.py`` in newer trees), ``LlamaModel.modify_tensors``,
permutes the rows of ``q_proj`` per attention head and those of ``k_proj`` per KV head
(``LlamaModel.permute``: rows viewed as (heads, 2, head_dim/2) with the two middle axes swapped), so the
runtime's interleaved RoPE sees the pairs HF's rotate-half RoPE used. A row permutation P of W is a row
permutation of ΔW = B·A, i.e. of B alone: B_gguf = P·B, A unchanged. GPT-2's Conv1D weights are
transposed by the converter (``GPT2Model.modify_tensors``) into the (out, in) layout our factors already
have, so those factors are written as they are; llama.cpp's own LoRA converter transposes them a second
time (rejected by the loader, or silently wrong when the weight is square).

The factor <-> tensor rules of the loader (``src/llama-adapter.cpp``, ``llama_adapter_lora_init_impl``)
and graph (``src/llama-graph.cpp``, ``build_lora_mm`` and ``build_inp_embd``): ``lora_a`` is A (r, in) and
``lora_b`` is B (out, r) in PyTorch order; for ``token_embd`` ``lora_a`` is Aᵀ (n_vocab, r) because the
graph gathers rows of A by token id. Runtime scale = ``alpha ? alpha / rank : 1`` (times the user's
scale), with rank read from ``lora_b`` per tensor.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loratools.formats.gguf.names import GgufBase

TOKEN_EMBD = "token_embd.weight"


@cache
def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order of ``LlamaModel.permute(W, n_head, n_head)``: row i of the result is row ``perm[i]`` of W."""
    import torch

    from loratools.errors import ShapeError

    if n_head <= 0 or rows % (2 * n_head):
        raise ShapeError(f"{rows} rows do not split into {n_head} heads of an even head size")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _heads_for(base: GgufBase, tensor: str) -> int | None:
    """Heads of the Q/K permutation applied to ``tensor`` (a GGUF name), or None when not permuted."""
    if not base.spec.permute_qk:
        return None
    if tensor.endswith(".attn_q.weight"):
        return base.n_head
    if tensor.endswith(".attn_k.weight"):
        return base.n_head_kv
    return None


def rows_to_gguf(base: GgufBase, tensor: str, up: torch.Tensor) -> torch.Tensor:
    """B rewritten the way the converter rewrites the base weight ``tensor``."""
    heads = _heads_for(base, tensor)
    return up if heads is None else up[qk_permutation(up.shape[0], heads)]


def rows_from_gguf(base: GgufBase, tensor: str, up: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rows_to_gguf`."""
    import torch

    heads = _heads_for(base, tensor)
    return up if heads is None else up[torch.argsort(qk_permutation(up.shape[0], heads))]


def is_permuted(base: GgufBase, tensor: str) -> bool:
    return _heads_for(base, tensor) is not None


def runtime_scale(alpha: float, rank: int) -> float:
    """llama.cpp's ``llama_adapter_lora_weight::get_scale`` at user scale 1: alpha 0 means no scaling."""
    return alpha / rank if alpha else 1.0


def delta_as_runtime(lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float, tensor: str) -> torch.Tensor:
    """ΔW of one GGUF pair in the base GGUF tensor's PyTorch layout, as the graph applies it (fp32).

    ``build_lora_mm``: y += scale·B·(A·x), so ΔW = scale·B·A (out, in). ``build_inp_embd``: the rows of
    ``lora_a`` (n_vocab, r) picked by token id, times Bᵀ: ΔW = scale·A·Bᵀ (n_vocab, n_embd).
    """
    a, b = lora_a.float(), lora_b.float()
    scale = runtime_scale(alpha, int(b.shape[1]))
    if tensor.endswith(TOKEN_EMBD):
        return (a @ b.T) * scale
    return (b @ a) * scale
