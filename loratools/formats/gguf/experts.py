"""Expert LoRA -> the slices of a GGUF MoE base's stacked expert tensors, for merging only.

llama.cpp's converter (``conversion/qwen.py`` ``Qwen2MoeModel.modify_tensors``, inherited by Qwen3-MoE;
``conversion/llama.py`` for Mixtral) stacks each layer's per-expert weights with ``torch.stack(dim=0)`` into
one tensor per projection: ``blk.L.ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``, PyTorch shape
``(E, out, in)`` (GGUF ``ne = {in, out, E}``), the rows of each expert as the Hugging Face weight holds them
(no permutation: only Llama's attn_q/attn_k rows are permuted). A fused ``gate_up_proj`` is split on its
rows, gate ``[:I]`` then up ``[I:]`` (the converter's own split). gpt-oss (``conversion/gpt_oss.py``) holds its
experts ``(E, in, out)``: the converter transposes them and splits ``gate_up_proj``'s interleaved columns, gate
``::2`` and up ``1::2``. DeepSeek-V2/V3 (``deepseek2``, ``conversion/deepseek.py``) stacks its routed experts like
Qwen, keeps the shared expert 2-D (``ffn_*_shexp``, an ordinary tensor) and splits MLA's ``kv_b_proj`` per head
into ``attn_k_b`` (transposed) and ``attn_v_b``, merged here head by head. Slice ``e`` of such a tensor is one
contiguous byte range (quant blocks run along ``in``), which is what lets a merge stream one expert at a time.

llama.cpp has no runtime expert LoRA (a GGUF adapter adapts 2-D matmuls by tensor name), so expert
modules are never written as a GGUF adapter: :func:`expert_problem` says so, and merging is the way out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loratools.formats.gguf.names import GgufBase
    from loratools.model.adapter import LoraModule

#: a per-expert module path (Mixtral's experts.3.w1, Qwen3-MoE's experts.3.gate_proj)
PER_EXPERT = re.compile(r"^(?P<pre>.+?)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\.(?P<part>\w+)$")
#: per-expert leaf -> the Hugging Face projection the GGUF name table maps (w1 gate, w3 up, w2 down)
_PARTS = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
          "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # fmt: skip
#: fused in-memory expert parameter -> its projections in row order
_FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
#: GGUF architectures converted from (E, in, out) expert parameters whose gate_up_proj columns interleave:
#: conversion/gpt_oss.py ``GptOssModel.modify_tensors`` transposes to (E, out, in) and takes gate rows ``::2``,
#: up rows ``1::2`` (transformers' ``GptOssExperts._apply_gate``: ``gate_up[..., ::2], gate_up[..., 1::2]``)
_IN_OUT = frozenset({"gpt-oss"})

ADAPTER_HINT = (
    "merge it into the GGUF base instead (loratools merge BASE.gguf ADAPTER -o merged.gguf writes each expert's ΔW "
    "into ffn_*_exps), or --exclude the expert modules to write the rest as a GGUF adapter"
)


@dataclass
class ExpertPart:
    """One expert's update of one stacked tensor: ΔW = up · down (scale folded into ``up``), fp32."""

    tensor: str
    expert: int
    down: torch.Tensor
    up: torch.Tensor
    num_experts: int | None  # the expert count the adapter states (target_parameters), None when unknown


def is_expert_module(name: str, m: LoraModule) -> bool:
    return hasattr(m, "num_experts") or (bool(PER_EXPERT.match(name)) and name.rsplit(".", 1)[-1] in _PARTS)


def expert_problem(name: str, base: GgufBase, merge: bool) -> tuple[str, str, str] | None:
    """(code, message, hint) when expert module ``name`` cannot go where it is headed; None when a merge takes it."""
    if not merge:
        return (
            "expert",
            f"{name}: an expert LoRA; llama.cpp has no runtime expert LoRA (a GGUF adapter adapts 2-D matrix "
            "multiplications by tensor name, the experts are one 3-D ffn_*_exps tensor per layer)",
            ADAPTER_HINT,
        )
    return None


def split_kv_b(name: str, base: GgufBase) -> tuple[str, str] | None:
    """(attn_k_b, attn_v_b) when ``name`` is a DeepSeek MLA ``kv_b_proj`` whose GGUF base holds it split (llama.cpp's
    ``DeepseekV2Model.modify_tensors``: ``kv_b.view(H, nope + v, kv_rank)`` split on dim 1, the K part transposed:
    ``attn_k_b`` (H, kv_rank, nope), ``attn_v_b`` (H, v, kv_rank)); None otherwise (an unsplit ``attn_kv_b`` is
    an ordinary 2-D tensor)."""
    if not name.endswith(".self_attn.kv_b_proj") or base.tensors is None:
        return None
    stem = base.gguf_name(name)
    if stem is None or stem in base.tensors:
        return None
    kb, vb = stem.replace(".attn_kv_b.", ".attn_k_b."), stem.replace(".attn_kv_b.", ".attn_v_b.")
    return (kb, vb) if kb in base.tensors and vb in base.tensors else None


#: GGUF architecture -> tensor kinds its llama.cpp graph multiplies without the LoRA hook (``build_lora_mm``):
#: a GGUF adapter on them loads and changes nothing. Seen in the runtime (b11739): DeepSeek's MLA attn_q_a /
#: attn_q_b / attn_kv_a_mqa pairs left the logits at the base's (attn_output and the FFNs took theirs)
UNAPPLIED = {"deepseek2": ("attn_q_a", "attn_q_b", "attn_kv_a_mqa")}


def unapplied_problem(name: str, tensor: str | None, base: GgufBase) -> tuple[str, str, str] | None:
    """(code, message, hint) for a GGUF adapter pair the runtime would load and never apply, else None."""
    kinds = UNAPPLIED.get(base.arch, ())
    kind = tensor.split(".")[-2] if tensor and tensor.count(".") >= 2 else None
    if kind not in kinds:
        return None
    return (
        "not_applied",
        f"{name}: llama.cpp's {base.arch} graph multiplies {kind} without its LoRA hook: a GGUF adapter pair on "
        "it loads and changes nothing",
        f"merge it into the GGUF base instead (loratools merge BASE.gguf ADAPTER -o merged.gguf), or --exclude "
        f"'{name.rsplit('.', 1)[-1]}$' to write the rest as a GGUF adapter",
    )


def kv_b_problem(name: str, merge: bool) -> tuple[str, str, str]:
    """(code, message, hint) for a split kv_b_proj that cannot go where it is headed."""
    if merge:
        why = "a DoRA or bias LoRA; only a plain LoRA splits into attn_k_b / attn_v_b exactly"
        return "kv_b_split", f"{name}: {why}", "merge into the Hugging Face base instead"
    return (
        "kv_b_split",
        f"{name}: the GGUF base holds kv_b_proj split per head into 3-D attn_k_b (transposed) and attn_v_b "
        "(llama.cpp's DeepSeek MLA layout), which a GGUF adapter cannot adapt",
        "merge it into the GGUF base instead (loratools merge BASE.gguf ADAPTER -o merged.gguf), or --exclude "
        "'kv_b_proj$' to write the rest as a GGUF adapter",
    )


def _kv_b_parts(name: str, m: Any, base: GgufBase, kb: str, vb: str) -> tuple[list[ExpertPart], str | None]:
    """kv_b_proj's ΔW = B·A (H·(nope + v), kv_rank) as per-head slices, exactly as the converter splits the
    weight: ``attn_k_b[h] = (B_h[:nope]·A)ᵀ = Aᵀ·B_h[:nope]ᵀ`` and ``attn_v_b[h] = B_h[nope:]·A``."""
    assert base.tensors is not None
    k_shape, v_shape = tuple(base.tensors[kb][0]), tuple(base.tensors[vb][0])
    if len(k_shape) != 3 or len(v_shape) != 3 or k_shape[0] != v_shape[0] or m.kind != "linear":
        return [], f"{name}: base tensors {kb} / {vb} are not the per-head 3-D split of kv_b_proj"
    (heads, rank_k, nope), (_, v, rank_v) = k_shape, v_shape
    up, down = m.factors()
    up, down = up.float() * m.scale, down.float()
    if m.fan_in_fan_out or up.shape[0] != heads * (nope + v) or down.shape[1] != rank_k or rank_k != rank_v:
        return [], (
            f"{name}: the update is {[up.shape[0], down.shape[1]]} (out, in); {kb} {list(base.tensors[kb][0])} and "
            f"{vb} {list(base.tensors[vb][0])} split a kv_b_proj of {[heads * (nope + v), rank_k]}"
        )
    per = up.view(heads, nope + v, -1)
    parts = [ExpertPart(kb, h, per[h, :nope].T.contiguous(), down.T.contiguous(), None) for h in range(heads)]
    parts += [ExpertPart(vb, h, down.contiguous(), per[h, nope:].contiguous(), None) for h in range(heads)]
    return parts, None


def expert_parts(name: str, m: Any, base: GgufBase) -> tuple[list[ExpertPart], str | None]:
    """The parts of expert module ``m`` in ``base``'s GGUF tensors (or of a split kv_b_proj), or ([], why not)."""
    split = split_kv_b(name, base)
    if split is not None:
        return _kv_b_parts(name, m, base, *split)
    if hasattr(m, "num_experts"):  # an ExpertLoraModule: a slice of the fused in-memory parameter
        container, _, leaf = m.parameter.rpartition(".")
        projections = _FUSED.get(leaf)
        if projections is None or not container.endswith((".mlp.experts", ".block_sparse_moe.experts")):
            return [], f"{name}: expert parameter {m.parameter} has no GGUF expert tensor loratools knows"
        if m.fan_in_fan_out != (base.arch in _IN_OUT):
            held = "(in, out)" if m.fan_in_fan_out else "(out, in)"
            return [], (
                f"{name}: expert parameter {m.parameter} stores experts {held}, the layout of "
                f"{'gpt-oss' if m.fan_in_fan_out else 'Qwen3-MoE/Mixtral/DeepSeek'} checkpoints; a {base.arch} "
                f"GGUF is converted from {'(out, in)' if m.fan_in_fan_out else '(in, out)'} experts"
            )
        pre, expert, count = container.rsplit(".", 2)[0], m.expert, m.num_experts
    else:
        match = PER_EXPERT.match(name)
        assert match is not None
        pre, expert, count = match["pre"], int(match["e"]), None
        projections = (_PARTS[match["part"]],)
    up, down = m.factors()
    up = up.float() * m.scale
    rows = up.shape[0] // len(projections)
    if rows * len(projections) != up.shape[0]:
        return [], f"{name}: {up.shape[0]} output rows do not split into {', '.join(projections)}"
    parts, step = [], len(projections) if base.arch in _IN_OUT else 1  # gpt-oss: gate ::2, up 1::2
    for i, proj in enumerate(projections):
        tensor = base.gguf_name(f"{pre}.mlp.experts.{proj}")
        if tensor is None:
            return [], f"{name}: an expert LoRA, and a {base.arch} GGUF has no stacked expert tensors"
        rows_i = up[i::step] if step > 1 else up[i * rows : (i + 1) * rows]
        parts.append(ExpertPart(tensor, expert, down.float().contiguous(), rows_i.contiguous(), count))
    return parts, None


def part_problem(name: str, part: ExpertPart, base: GgufBase, orientation_known: bool) -> str | None:
    """Why ``part`` does not fit the base tensor (expert count, expert shape), or None."""
    if base.tensors is None:
        return None
    if part.tensor not in base.tensors:
        return (
            f"{name}: an expert LoRA, but the GGUF base has no stacked expert tensor {part.tensor} (is it the "
            "mixture-of-experts model the adapter was trained on?)"
        )
    shape = base.tensors[part.tensor][0]
    want = (part.up.shape[0], part.down.shape[1])
    if len(shape) != 3:
        return f"{name}: base tensor {part.tensor} {list(shape)} is not a stack of experts (E, out, in)"
    n = shape[0]
    if part.num_experts is not None and part.num_experts != n:
        return f"{name}: the adapter holds {part.num_experts} experts, base tensor {part.tensor} {list(shape)}: {n}"
    if part.expert >= n:
        return f"{name}: expert {part.expert}, but base tensor {part.tensor} {list(shape)} holds {n} experts"
    if tuple(shape[1:]) != want:
        return (
            f"{name}: expert {part.expert}'s update is {list(want)} (out, in), base tensor {part.tensor} holds "
            f"experts of {list(shape[1:])}"
        )
    if not orientation_known and want[0] == want[1]:
        return (
            f"{name}: the update is square per expert and the adapter does not say whether its model stores "
            "experts (out, in) or (in, out)"
        )
    return None
