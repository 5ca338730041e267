"""Which GGUF tensor pairs an adapter becomes, and what a GGUF adapter cannot hold (refused, never dropped).

Every module becomes ``<gguf name>.lora_a`` / ``.lora_b`` with its own PEFT scale folded into B, so the
file's ``adapter.lora.alpha`` is 0 and the runtime's ``alpha ? alpha/rank : 1`` is exactly 1 for every
tensor: rsLoRA, ``rank_pattern``/``alpha_pattern`` and kohya per-module alphas all survive. Full tensors
are dropped only when they equal the base's (PEFT's saved embedding ``base_layer``); anything else a GGUF
LoRA cannot carry is one :class:`Problem` with the way out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loratools.errors import ShapeError
from loratools.formats.gguf.experts import (
    expert_problem,
    is_expert_module,
    kv_b_problem,
    split_kv_b,
    unapplied_problem,
)
from loratools.formats.gguf.rewrites import TOKEN_EMBD, rows_to_gguf

if TYPE_CHECKING:
    import torch

    from loratools.formats.gguf.names import GgufBase
    from loratools.model.adapter import Adapter, LoraModule

_WRONG_BASE = "the GGUF base is not the model this adapter was trained on"
MERGE_HINT = "merge the adapter into the base instead (loratools merge BASE ADAPTER -o merged)"
LOWER_HINT = (
    "lower it to plain LoRA against the Hugging Face base first (loratools convert ADAPTER --to gguf --as-lora "
    "--base HF_FOLDER -o adapter.gguf), or merge it (loratools merge BASE ADAPTER -o merged)"
)
#: the ways out of a merge into a GGUF base (never the merge just run)
HF_MERGE_HINT = "merge into the Hugging Face base instead (loratools merge HF_FOLDER ADAPTER -o merged/)"
MERGE_LOWER_HINT = (
    "write the GGUF adapter against the Hugging Face folder first (loratools convert ADAPTER --to gguf --as-lora "
    "--base HF_FOLDER -o adapter.gguf lowers it to plain LoRA and drops a saved copy equal to the base) and merge "
    f"that; or {HF_MERGE_HINT}"
)
#: the tensor a tied base's merge adds, holding the original token_embd (plus any lm_head update)
OUTPUT = "output.weight"


@dataclass
class Problem:
    """One thing the GGUF adapter cannot hold: ``module`` (or tensor), a stable ``code``, message, hint."""

    module: str | None
    code: str
    message: str
    hint: str | None = None


@dataclass
class Pair:
    """One GGUF LoRA pair: base tensor name, lora_a and lora_b (fp32, scale folded into lora_b)."""

    tensor: str
    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    #: a merge's update of one expert slice ``tensor[expert]`` of a stacked ffn_*_exps tensor (:mod:`.experts`)
    expert: int | None = None


@dataclass
class GgufPlan:
    pairs: list[Pair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    #: full tensors dropped because they equal the base's (PEFT's saved embedding base_layer)
    dropped: list[str] = field(default_factory=list)


def tied_problem(name: str, m: LoraModule, base: GgufBase, tensor: str | None, merge: bool) -> Problem | None:
    """An lm_head or embedding LoRA on a base whose output reuses ``token_embd`` (tied).

    The runtime finds a LoRA by tensor name, so a ``token_embd`` pair is also applied to the output matmul,
    where an embedding's ``lora_a`` (n_vocab, r) does not fit (llama.cpp aborts:
    ``GGML_ASSERT(ggml_can_mul_mat(a, b))``), and an lm_head pair has no tensor. A merge unties instead
    (``output.weight`` = the original ``token_embd``) where the architecture's loader takes an
    ``output.weight``; Gemma and Gemma 2 always reuse ``token_embd``, so nothing can carry one side alone.
    """
    head = tensor == OUTPUT or name.rsplit(".", 1)[-1] == "lm_head"
    if not base.tied or not (head or (m.kind == "embedding" and tensor == TOKEN_EMBD)):
        return None
    if merge and not base.spec.output_dropped:
        return None
    exclude = f"--exclude '{name}$' to leave it out"
    if base.spec.output_dropped:
        hint = (
            f"llama.cpp's {base.arch} always uses token_embd as its output too, so no {base.arch} GGUF can hold a "
            f"change to one side only: {exclude}, or serve the merged Hugging Face model"
        )
    else:
        hint = (
            f"merge it into the GGUF base (loratools merge BASE.gguf ADAPTER -o merged.gguf), which unties: "
            f"output.weight keeps the original embeddings; or {exclude}"
        )
    if head:
        why = "so the GGUF model has no separate output tensor for this LoRA to attach to"
        return Problem(name, "tied_output", f"{name}: the base ties lm_head to the token embeddings, {why}", hint)
    why = "llama.cpp would apply its token_embd LoRA to the output matmul too (and aborts there)"
    return Problem(name, "tied_embedding", f"{name}: the base ties lm_head to the token embeddings: {why}", hint)


def _module_problem(name: str, m: LoraModule, base: GgufBase, tensor: str | None, merge: bool) -> Problem | None:
    if not hasattr(m, "factors"):  # an OFT/BOFT/IA3 module left unlowered: no B·A pair without the base weight
        what = getattr(m, "label", "") or type(m).__name__
        message = f"{name}: {what} modules have no place in a GGUF LoRA (B·A pairs only)"
        return Problem(name, "family", message, LOWER_HINT)
    if m.magnitude is not None:
        return Problem(name, "dora", f"{name}: DoRA magnitude vectors have no place in a GGUF LoRA", LOWER_HINT)
    if m.bias is not None:
        return Problem(name, "bias", f"{name}: LoRA biases (lora_B.bias) have no place in a GGUF LoRA", MERGE_HINT)
    if m.kind == "conv":
        return Problem(name, "conv", f"{name}: conv LoRA modules have no place in a GGUF LoRA", MERGE_HINT)
    tied = tied_problem(name, m, base, tensor, merge)
    if tied is not None:
        return tied
    if tensor is None and is_expert_module(name, m):
        found = expert_problem(name, base, merge)
        return None if found is None else Problem(name, *found)
    if tensor is None:
        return Problem(
            name,
            "unknown_module",
            f"{name}: no {base.arch} GGUF tensor corresponds to this module",
            "check --base is the model the adapter was trained on; --exclude the module to leave it out",
        )
    if m.kind == "embedding" and tensor != TOKEN_EMBD:
        return Problem(name, "embedding", f"{name}: llama.cpp applies embedding LoRA to token_embd only", MERGE_HINT)
    if base.tensors is not None and tensor not in base.tensors and not (merge and base.tied and tensor == OUTPUT):
        return Problem(name, "missing_in_base", f"{name}: the GGUF base has no tensor {tensor}", None)
    return None


def _pair(name: str, m: LoraModule, base: GgufBase, tensor: str) -> Pair:
    up, down = m.factors()
    up = rows_to_gguf(base, tensor, up * m.scale)  # fp32 product, one cast when written
    lora_a = down.T.contiguous() if m.kind == "embedding" else down
    return Pair(tensor, name, lora_a.contiguous(), up.contiguous())


def _shape_problem(pair: Pair, base: GgufBase) -> Problem | None:
    """The loader's shape rule against the base tensor (ne[0] is the last PyTorch dimension)."""
    if base.tensors is None:
        return None
    shape = base.tensors[TOKEN_EMBD if pair.tensor not in base.tensors else pair.tensor][0]  # untied output
    a, b = tuple(pair.lora_a.shape), tuple(pair.lora_b.shape)
    if pair.tensor == TOKEN_EMBD:
        ok = len(shape) == 2 and shape == (a[0], b[0]) and a[1] == b[1]
    else:
        ok = len(shape) == 2 and shape == (b[0], a[1]) and a[0] == b[1]
    if ok:
        return None
    return Problem(
        pair.module,
        "shape",
        f"{pair.module}: lora_a {list(a)} / lora_b {list(b)} do not fit base tensor {pair.tensor} {list(shape)}",
        _WRONG_BASE,
    )


def _replacement(key: str, t: torch.Tensor, base: GgufBase, merge: bool) -> tuple[bool, Problem | None]:
    """(dropped, problem) for one full tensor: dropped when it equals the base's, refused otherwise (a
    merge's hint does not suggest the merge just run)."""
    leaf = key.rsplit(".", 2)[-2] if key.count(".") else key
    same = _equals_base(key, t, base)
    if same:
        return True, None
    if "norm" in leaf or "ln_" in leaf:
        why = "the llama.cpp loader skips norm tensors in adapters (llama_adapter_lora_init_impl): the change is lost"
    else:
        why = "a GGUF LoRA holds lora_a/lora_b pairs only; full tensors (modules_to_save) cannot be carried"
    if same is None:
        why += "; not comparable with the base (pass the Hugging Face folder, or a GGUF base not K/I-quantized)"
    return False, Problem(key, "full_tensor", f"{key}: {why}", MERGE_LOWER_HINT if merge else LOWER_HINT)


def _equals_base(key: str, t: torch.Tensor, base: GgufBase) -> bool | None:
    """Whether the HF tensor ``key`` equals the base's own (exactly, or as the GGUF type stores it); None
    when the base cannot tell."""
    import torch

    if base.hf is not None:
        mod, _, suffix = key.rpartition(".")
        found = base.hf.tensor_key(mod, suffix)
        if found is None:
            return None
        ref = base.hf.get(found)
        return ref.shape == t.shape and torch.equal(t.to(ref.dtype), ref)
    if base.gguf_path is not None:
        from loratools.formats.gguf.names import equals_gguf_tensor

        name = base.gguf_name(key.rpartition(".")[0])
        if base.tied and name == OUTPUT:
            name = TOKEN_EMBD  # PEFT's saved lm_head of a tied base is the embedding matrix
        return None if name is None else equals_gguf_tensor(base.gguf_path, name, t)
    return None


def plan(adapter: Adapter, base: GgufBase, merge: bool = False) -> GgufPlan:
    """The GGUF pairs of ``adapter`` for ``base``, the full tensors dropped as equal, and every problem.

    ``merge``: the pairs are merged into a GGUF base rather than written as an adapter, so a tied base's
    lm_head and embedding LoRAs are taken (the merge unties; see :func:`tied_problem`)."""
    from loratools.formats.gguf.fused_tensors import regroup

    out = GgufPlan()
    regrouped = regroup(adapter.modules, base)
    out.problems += [Problem(name, "shape", message, _WRONG_BASE) for name, message in regrouped.problems]
    for r in regrouped.rewritten:
        try:
            pair = Pair(r.tensor, r.module, r.down.contiguous(), rows_to_gguf(base, r.tensor, r.up).contiguous())
        except ShapeError as exc:
            out.problems.append(Problem(r.module, "shape", f"{r.module}: {exc.message} ({r.tensor})", _WRONG_BASE))
            continue
        if base.tensors is not None and r.tensor not in base.tensors:
            out.problems.append(Problem(r.module, "missing_in_base", f"{r.module}: the GGUF base has no {r.tensor}"))
        elif (problem := _shape_problem(pair, base)) is not None:
            out.problems.append(problem)
        else:
            out.pairs.append(pair)
    for name, m in adapter.modules.items():
        if name in regrouped.consumed:
            continue
        if merge and is_expert_module(name, m) and m.magnitude is None and m.bias is None:
            _expert_pairs(name, m, base, out)
            continue
        if split_kv_b(name, base) is not None:  # DeepSeek MLA kv_b_proj held split per head (3-D)
            if merge and m.magnitude is None and m.bias is None:
                _expert_pairs(name, m, base, out)
            else:
                out.problems.append(Problem(name, *kv_b_problem(name, merge)))
            continue
        tensor = base.gguf_name(name)
        problem = _module_problem(name, m, base, tensor, merge)
        if problem is None and not merge and (found := unapplied_problem(name, tensor, base)) is not None:
            problem = Problem(name, *found)
        if problem is None and tensor is not None:
            try:
                pair = _pair(name, m, base, tensor)
            except ShapeError as exc:  # rows that do not split into the base's heads
                out.problems.append(Problem(name, "shape", f"{name}: {exc.message} ({tensor})", _WRONG_BASE))
                continue
            problem = _shape_problem(pair, base)
            if problem is None:
                out.pairs.append(pair)
        if problem is not None:
            if merge and problem.hint in (MERGE_HINT, LOWER_HINT):
                problem.hint = HF_MERGE_HINT if problem.hint == MERGE_HINT else MERGE_LOWER_HINT
            out.problems.append(problem)
    for key, t in adapter.replacements.items():
        dropped, problem = _replacement(key, t, base, merge)
        if dropped:
            out.dropped.append(key)
        if problem is not None:
            out.problems.append(problem)
    out.pairs = _one_pair_per_tensor(out.pairs)
    return out


def _expert_pairs(name: str, m: LoraModule, base: GgufBase, out: GgufPlan) -> None:
    """A merge's pairs of expert module ``m``: one per expert slice of each stacked tensor it updates."""
    from loratools.formats.gguf.experts import expert_parts, part_problem

    parts, why = expert_parts(name, m, base)
    if why is not None:  # a split kv_b_proj that does not fit: another model's base
        out.problems.append(Problem(name, "expert", why, _WRONG_BASE if split_kv_b(name, base) else HF_MERGE_HINT))
    for part in parts:
        why = part_problem(name, part, base, getattr(m, "orientation_known", True))
        if why is not None:
            out.problems.append(Problem(name, "expert_shape", why, _WRONG_BASE))
        else:
            out.pairs.append(Pair(part.tensor, name, part.down, part.up, expert=part.expert))


def _one_pair_per_tensor(pairs: list[Pair]) -> list[Pair]:
    """Pairs on one tensor (a fused projection's parts beside a LoRA on the fused module) as one pair whose
    ΔW is their sum, exactly: A's stacked, B's side by side (token_embd's lora_a is Aᵀ: side by side too)."""
    import torch

    by_tensor: dict[tuple[str, int | None], list[Pair]] = {}
    for p in pairs:
        by_tensor.setdefault((p.tensor, p.expert), []).append(p)
    out = []
    for (tensor, expert), group in by_tensor.items():
        if len(group) == 1:
            out.append(group[0])
            continue
        a_dim = 1 if tensor == TOKEN_EMBD else 0
        lora_a = torch.cat([p.lora_a for p in group], dim=a_dim)
        lora_b = torch.cat([p.lora_b for p in group], dim=1)
        out.append(Pair(tensor, " + ".join(p.module for p in group), lora_a, lora_b, expert))
    return out
