"""Expert LoRA -> the slices of a GGUF MoE base's stacked expert tensors, for merging only.

llama.cpp's converter (``conversion/qwen.py`` ``Qwen2MoeModel.modify_tensors``, inherited by Qwen3-MoE;
``conversion/llama.py`` for Mixtral) stacks each layer's per-expert weights with ``torch.stack(dim=0)`` into
one tensor per projection: ``blk.L.ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``, PyTorch shape
``(E, out, in)`` (GGUF ``ne = {in, out, E}``), the rows of each expert as the Hugging Face weight holds them
(no permutation: only Llama's attn_q/attn_k rows are permuted). A fused ``gate_up_proj`` is split on its
rows, gate ``[:I]`` then up ``[I:]`` (the converter's own split). Slice ``e`` of such a tensor is one
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


def expert_parts(name: str, m: Any, base: GgufBase) -> tuple[list[ExpertPart], str | None]:
    """The parts of expert module ``m`` in ``base``'s GGUF tensors, or ([], why not)."""
    if hasattr(m, "num_experts"):  # an ExpertLoraModule: a slice of the fused in-memory parameter
        container, _, leaf = m.parameter.rpartition(".")
        projections = _FUSED.get(leaf)
        if projections is None or not container.endswith((".mlp.experts", ".block_sparse_moe.experts")):
            return [], f"{name}: expert parameter {m.parameter} has no GGUF expert tensor loratools knows"
        if m.fan_in_fan_out:
            return [], (
                f"{name}: expert parameter {m.parameter} stores experts (in, out) (gpt-oss: gate and up columns "
                f"interleave); the {base.arch} GGUF holds (out, in) experts"
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
    parts = []
    for i, proj in enumerate(projections):
        tensor = base.gguf_name(f"{pre}.mlp.experts.{proj}")
        if tensor is None:
            return [], f"{name}: an expert LoRA, and a {base.arch} GGUF has no stacked expert tensors"
        parts.append(ExpertPart(tensor, expert, down.float().contiguous(), up[i * rows : (i + 1) * rows].contiguous(),
                                count))  # fmt: skip
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
