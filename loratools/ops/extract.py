"""``extract``: a LoRA from a fine-tuned checkpoint minus its base, streamed tensor by tensor.

For every weight of TUNED: ΔW = tuned − base in fp32. Linear (2-D) and conv (4-D) weights with a
non-negligible ΔW become LoRA modules from a truncated SVD (exact for ``min(out, in) <= threshold`` or
``exact``; above it a randomized SVD with oversampling and power iterations whose truncation error stays
within 1% of the optimal one on fine-tuning deltas). The σ are split as √σ, alpha = rank (scale 1).
Other changed tensors (norms, embeddings, new or resized tensors) are saved as full replacements
(PEFT modules_to_save); a changed bias of a module that became LoRA goes into the LoRA bias
(``lora_B.bias``). So are modules named by ``save_modules``, and output heads (``lm_head``, ``score``, …)
whose rank-k fit would lose more than ``head_error`` of ‖ΔW‖_F (a densely fine-tuned head: a LoRA of it
would be far off, whole it is exact); the error is reported.

Memory is one tensor pair's working set (the pair, ΔW in fp32 and the SVD's factors) plus the output:
tensors are read with ``pread`` into private buffers (a memory map would add every page read to the
process's RSS) and freed after each one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.args.numeric_args import NON_NEGATIVE, POSITIVE_INT, check_number, check_optional
from loratools.errors import UsageError

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter

#: leaf module names that are embeddings (saved whole, never factored)
_EMBEDDING = re.compile(r"(^|\.)(embed\w*|\w*_embeddings?|wte|wpe|shared|embeddings)$")
#: output heads (vocabulary or label projections): fine-tunes often change them densely, so a low-rank
#: fit is checked and the tensor saved whole when it loses more than ``head_error`` of the change
_HEAD = re.compile(r"(^|\.)(lm_head|output|score|classifier|qa_outputs)$")
#: model types whose linear layers are transformers' Conv1D (weight stored in×out)
_CONV1D_TYPES = {"gpt2": ("c_attn", "c_proj", "c_fc"), "openai-gpt": ("c_attn", "c_proj", "c_fc")}
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class ExtractResult:
    """The extracted adapter and what happened to every changed tensor."""

    adapter: Adapter
    modules: list[dict[str, Any]] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    whole: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "modules": self.modules,
            "replaced": self.replaced,
            "skipped_negligible": len(self.skipped),
            "saved_whole": self.whole,
        }


def _conv1d(config: dict[str, Any] | None, module: str) -> bool:
    leaves = _CONV1D_TYPES.get(str((config or {}).get("model_type")), ())
    return module.rsplit(".", 1)[-1] in leaves


def _factorable(key: str, shape: tuple[int, ...]) -> bool:
    module, _, suffix = key.rpartition(".")
    return suffix == "weight" and len(shape) in (2, 4) and not _EMBEDDING.search(module) and min(shape[:2]) > 1


def extract(
    base: str | Path,
    tuned: str | Path,
    *,
    rank: int | None = None,
    fro: float | None = None,
    max_rank: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    save_modules: str | None = None,
    head_error: float = 0.1,
    exact: bool = False,
    threshold: int = 1024,
    min_delta: float = 1e-6,
    dtype: str = "auto",
    seed: int = 0,
    output: str | Path | None = None,
    to: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    kohya_prefix: str | None = None,
) -> ExtractResult:
    """Extract a LoRA of ``rank`` (or per module the smallest rank keeping ``fro`` of ‖ΔW‖_F).

    Modules matching ``save_modules`` (a regex) are saved whole, and so is an output head whose
    low-rank error (relative to ‖ΔW‖_F) exceeds ``head_error`` (1: never).

    ``min_delta``: tensors with ‖ΔW‖ ≤ min_delta·‖W‖ are skipped as unchanged. ``include``/``exclude``
    filter module names (regexes). ``dtype`` (auto|fp32|fp16|bf16) of the factors; auto keeps the tuned
    tensor's. ``threshold``/``exact`` choose the SVD (see the module docstring). The output is PEFT
    unless ``to`` (``kohya_prefix`` names the modules of a kohya output, e.g. ``lora_te_``);
    ``progress(n)`` is called once per tensor examined.
    """
    import torch

    from loratools.args.filters import module_filter
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.model.adapter import Adapter, LoraModule
    from loratools.model.lowrank import check_rule, dense_svd
    from loratools.ops._algebra_io import write
    from loratools.ops.merge.factors import release_memory
    from loratools.ops.merge.write import BaseBytes
    from loratools.publishing.hub import resolve_path

    if (rank is None) == (fro is None):
        raise UsageError(
            "give exactly one of --rank and --fro", hint="e.g. loratools extract base/ tuned/ --rank 16 -o lora/"
        )
    check_rule("rank", rank) if rank is not None else check_rule("fro", fro)  # noqa: B018
    check_optional("--max-rank", max_rank, POSITIVE_INT)
    check_number("--threshold", threshold, POSITIVE_INT)
    check_number("--min-delta", min_delta, NON_NEGATIVE)
    if dtype not in ("auto", *_DTYPES):
        raise UsageError(f"--dtype {dtype!r}: expected auto, fp32, fp16 or bf16")
    keep = module_filter(include, exclude)
    base_path, tuned_path = resolve_path(base, "base checkpoint"), resolve_path(tuned, "fine-tuned checkpoint")
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, torch.Tensor] = {}
    report, replaced, skipped, whole = [], [], [], []
    check_number("--head-error", head_error, NON_NEGATIVE)
    try:
        save_whole = re.compile(save_modules).search if save_modules else None
    except re.error as exc:
        raise UsageError(f"--save-module {save_modules!r} is not a valid regex: {exc}") from None
    with open_checkpoint(base_path) as rb, open_checkpoint(tuned_path) as rt:
        # pread into private buffers: a memory map of either file would add every page read to our RSS
        fb, ft = BaseBytes(rb), BaseBytes(rt)
        keys = [k for k in rt.keys() if keep(k.rpartition(".")[0])]
        lora_modules = set()
        for key in keys:
            module = key.rpartition(".")[0]
            if save_whole is not None and save_whole(module):
                continue
            if (
                key in rb
                and tuple(rb.info(key).shape) == tuple(rt.info(key).shape)
                and _factorable(key, tuple(rt.info(key).shape))
            ):
                lora_modules.add(module)
        pending_bias: dict[str, torch.Tensor] = {}
        for key in keys:
            if progress is not None:
                progress(1)
            module, _, suffix = key.rpartition(".")
            info = rt.info(key)
            new = ft.get(key)
            if key not in rb or tuple(rb.info(key).shape) != tuple(info.shape):
                replacements[key] = new
                replaced.append(key)
                continue
            if not new.is_floating_point():
                continue
            old = fb.get(key)
            # ΔW in fp32 only where it is used (factors, LoRA bias); a tensor kept whole needs its norm only
            delta = _difference(new, old) if module in lora_modules else None
            norm = float(torch.linalg.vector_norm(delta)) if delta is not None else _norm(new, old)
            if not math.isfinite(norm):  # NaN/Inf somewhere (a full isfinite() would cost 3 copies of ΔW)
                from loratools.model.finite import require_finite

                require_finite(new, key, rt.file_of(key), hint="the fine-tuned checkpoint is damaged")
                require_finite(old, key, rb.file_of(key), hint="the base checkpoint is damaged")
                require_finite(
                    delta if delta is not None else _difference(new, old),
                    key,
                    f"{tuned} minus {base}",
                    hint="the difference overflows fp32",
                )
            unchanged = norm == 0 or norm <= min_delta * _norm(old)
            unchanged = unchanged or _only_cast(old, new)
            del old
            if unchanged:
                skipped.append(key)
                continue
            out_dtype = new.dtype if dtype == "auto" else getattr(torch, _DTYPES[dtype])
            if module in lora_modules and suffix == "bias":
                pending_bias[module] = delta.to(out_dtype)
                continue
            if module not in lora_modules or suffix != "weight":
                by_name = save_whole is not None and bool(save_whole(module))
                replacements[key] = new
                replaced.append(key)
                if module not in {w["name"] for w in whole} and (by_name or _EMBEDDING.search(module)):
                    reason = "--save-module" if by_name else "embedding"
                    whole.append({"name": module, "reason": reason, "lowrank_error": None})
                continue
            conv1d = delta.ndim == 2 and _conv1d(rt.config, module)
            matrix = delta.T if conv1d else delta.reshape(delta.shape[0], -1)
            target = min(rank, *matrix.shape) if rank is not None else None
            if max_rank is not None and target is not None:
                target = min(target, max_rank)
            u, s, vh = dense_svd(matrix, target, fro, exact=exact, threshold=threshold, generator=gen)
            if fro is not None and max_rank is not None:
                u, s, vh = u[:, :max_rank], s[:max_rank], vh[:max_rank]
            k = int(s.numel())
            kept = float((s.double() ** 2).sum()) ** 0.5
            retained = min(kept / norm, 1.0) if norm > 0 else 1.0
            error = max(0.0, 1.0 - retained**2) ** 0.5
            if _HEAD.search(module) and (error > head_error or k * sum(matrix.shape) >= matrix.numel()):
                replacements[key] = new  # a head low rank cannot hold: whole, like the fine-tune has it
                replaced.append(key)
                lora_modules.discard(module)
                whole.append({"name": module, "reason": "head", "rank": k, "lowrank_error": error})
                del delta, matrix, u, s, vh, new
                release_memory()
                continue
            del new
            if k == 0:
                skipped.append(key)
                continue
            root = s.sqrt()
            up, down = (u * root), (root[:, None] * vh)
            if delta.ndim == 4:
                down, up = down.reshape(k, *delta.shape[1:]), up.reshape(up.shape[0], k, 1, 1)
            modules[module] = LoraModule(
                down=down.to(out_dtype).contiguous(),
                up=up.to(out_dtype).contiguous(),
                alpha=float(k),
                kind="conv" if delta.ndim == 4 else "linear",
                fan_in_fan_out=conv1d,
            )
            report.append(
                {"name": module, "shape": list(matrix.shape), "rank": k, "norm": norm, "retained_fro": retained}
            )
            del delta, matrix, u, s, vh, up, down
            release_memory()
        for module, bias in pending_bias.items():
            if module in modules:
                modules[module].bias = bias
            else:
                replacements[f"{module}.bias"] = bias + fb.get(f"{module}.bias").to(bias.dtype)
                replaced.append(f"{module}.bias")
        if any(m.bias is not None for m in modules.values()):  # PEFT's lora_bias is all-or-nothing
            for module, m in modules.items():
                if m.bias is None and f"{module}.bias" in rt:
                    m.bias = torch.zeros(m.out_features, dtype=m.up.dtype)
        # PEFT's modules_to_save replaces whole modules: save every tensor of a replaced module
        siblings: dict[str, list[str]] = {}
        for key in rt.keys():
            siblings.setdefault(key.rpartition(".")[0], []).append(key)
        for key in list(replacements):
            for other in siblings.get(key.rpartition(".")[0], []):
                if other not in replacements:
                    replacements[other] = ft.get(other)
        fb.close()
        ft.close()
        config = rt.config
    if not modules and not replacements:
        raise UsageError(
            f"{tuned}: no tensor differs from {base} by more than {min_delta:g} (relative)",
            hint="check that the two checkpoints are a base and its fine-tune",
        )
    meta = {"format": "peft", "base_model": str((config or {}).get("_name_or_path") or base)}
    adapter = Adapter(modules=modules, replacements=replacements, meta=meta)
    result = ExtractResult(adapter, report, replaced, skipped, whole)
    if output is not None:
        params = {
            "rank": rank,
            "fro": fro,
            "max_rank": max_rank,
            "include": include,
            "exclude": exclude,
            "save_modules": save_modules,
            "head_error": head_error,
            "exact": exact,
            "threshold": threshold,
            "min_delta": min_delta,
            "seed": seed,
        }
        result.output = write(
            adapter,
            output,
            operation="extract",
            parameters=params,
            inputs={"base": base_path, "tuned": tuned_path},
            to=to,
            overwrite=overwrite,
            kohya_prefix=kohya_prefix,
            base=base,
        )
    return result


def _difference(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new − old in fp32, subtracted in row blocks: a mixed-dtype ``sub_`` casts through a temporary (and
    block views left alive in the caller would keep both tensors' memory)."""
    import torch

    delta = new.to(torch.float32, copy=True)
    for part, base_part in zip(delta.split(4096), old.split(4096), strict=True):
        part.sub_(base_part)
    return delta


def _norm(t: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """‖t‖_F (or ‖t − minus‖_F) in fp32, in row blocks: no fp32 copy of a whole bf16 tensor."""
    import torch

    pairs = zip(t.split(4096), minus.split(4096), strict=True) if minus is not None else None
    blocks = t.split(4096) if pairs is None else (a.float() - b.float() for a, b in pairs)
    return sum(float(torch.linalg.vector_norm(b, dtype=torch.float32)) ** 2 for b in blocks) ** 0.5


def _only_cast(old: torch.Tensor, new: torch.Tensor) -> bool:
    """True when ``new`` is just ``old`` rounded to another dtype (a bf16 copy of an fp32 base, say)."""
    import torch

    if old.dtype == new.dtype:
        return False
    return bool(torch.equal(old.to(new.dtype), new) or torch.equal(new.to(old.dtype), old))
