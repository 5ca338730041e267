"""``convert --as-lora``: any adapter lowered to plain LoRA, exactly by default, optimally truncated on request.

Per module (ΔW never formed where factors suffice):

- plain LoRA: kept as it is (truncated through the factor-space SVD when a rank rule is given);
- LoHa, LoKr (no weight decomposition): their exact low-rank form (:meth:`FamilyModule.lowrank`: the
  row-wise Khatri–Rao product of the LoHa factors, rank ≤ r₁·r₂; for LoKr the Kronecker product of the
  halves' SVDs, σ(kron) = σ(W1)⊗σ(W2)), then the factor-space SVD of that product;
- OFT, BOFT, IA3, diag-OFT, DoRA and LyCORIS ``dora_scale``: ΔW = W' − W against the base weight, a dense
  fp64 SVD, up to full rank;
- ``modules_to_save`` tensors of 2-D weights: ΔW = R − W against the base, lowered the same way.

Without a rule every module keeps all of its non-zero singular values (relative error ~1e-15). With
``rank`` (keep at most R) or ``fro`` (keep the smallest k retaining that fraction of ‖ΔW‖_F) the best
approximation of that rank (Eckart–Young) is kept; each module reports its relative error
‖ΔW − ΔW_k‖_F / ‖ΔW‖_F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from loratools.errors import UsageError

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter, LoraModule

#: singular values below this fraction of the largest are rounding noise of an exact factorization
_NOISE = 1e-12


@dataclass
class LoweredModule:
    """One module's lowering: its family, the rank kept, the exact rank and the relative error."""

    name: str
    family: str
    rank: int
    exact_rank: int
    relative_error: float
    source: str  # "factors" (no dense ΔW) or "dense" (ΔW against the base)


@dataclass
class LowerReport:
    modules: list[LoweredModule] = field(default_factory=list)
    kept_replacements: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": [vars(m) for m in self.modules],
            "kept_replacements": self.kept_replacements,
            "max_relative_error": max((m.relative_error for m in self.modules), default=0.0),
        }


def _keep(s: torch.Tensor, rank: int | None, fro: float | None) -> tuple[int, int]:
    """(rank kept, exact rank) for descending singular values ``s``."""
    from loratools.model.lowrank import select_rank

    exact = int((s > _NOISE * float(s[0])).sum()) if s.numel() and float(s[0]) > 0 else 0
    if rank is not None:
        return min(exact, select_rank(s, "rank", rank)), exact
    if fro is not None:
        return min(exact, select_rank(s, "fro", fro)), exact
    return exact, exact


def _error(s: torch.Tensor, k: int) -> float:
    total = float((s * s).sum())
    return math.sqrt(max(float((s[k:] * s[k:]).sum()), 0.0) / total) if total > 0 else 0.0


def _lora(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    k: int,
    shape: tuple[int, ...],
    transposed: bool,
    kind: str,
    dtype: torch.dtype,
) -> LoraModule:
    """A LoRA module (scale 1, alpha = k) holding U_k·Σ_k·V_kᵀ, √σ split between the factors."""
    from loratools.model.adapter import LoraModule

    root = torch.sqrt(s[:k])
    up, down = (u[:, :k] * root).to(dtype), (root[:, None] * vh[:k]).to(dtype)
    if kind == "conv":
        down = down.reshape(k, *shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    elif kind == "embedding":
        pass  # PEFT's embedding LoRA: down (r, num_embeddings), up (dim, r): ΔW(out=dim x in=num) = up·down
    return LoraModule(
        down=down.contiguous(),
        up=up.contiguous(),
        alpha=float(max(k, 1)),
        kind=kind,
        fan_in_fan_out=transposed and kind == "linear",
    )


def _dense_svd(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(d.to(torch.float64), full_matrices=False)
    return u, s, vh


def lower_to_lora(
    adapter: Adapter, reader: CheckpointReader | None = None, *, rank: int | None = None, fro: float | None = None
) -> tuple[Adapter, LowerReport]:
    """``adapter`` as a plain LoRA adapter (see the module docstring) and what each module became."""
    from dataclasses import replace

    from loratools.checkpoint.keymap import KeyMatcher
    from loratools.families.dense import delta_matrix
    from loratools.model.lowrank import lowrank_svd

    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if fro is not None and not 0 < fro <= 1:
        raise UsageError(f"--fro must be in (0, 1], got {fro}")
    matcher = KeyMatcher(reader.keys()) if reader is not None else None
    report = LowerReport()
    modules: dict[str, Any] = {}

    def base_weight(name: str) -> torch.Tensor | None:
        key = matcher.tensor_key(name) if matcher is not None else None
        return reader.get(key) if key is not None else None

    for name, m in adapter.modules.items():
        plain = hasattr(m, "down") and m.magnitude is None
        dtype = torch.float32 if not plain else m.down.dtype
        if plain and rank is None and fro is None:
            modules[name] = m
            report.modules.append(LoweredModule(name, "lora", m.rank, m.rank, 0.0, "factors"))
            continue
        w = base_weight(name) if m.needs_base else None
        key = matcher.tensor_key(name) if matcher is not None else None
        shape = tuple(reader.info(key).shape) if key is not None else tuple(getattr(m, "weight_shape", None) or ())
        kind = "embedding" if getattr(m, "kind", "") == "embedding" else ("conv" if len(shape) == 4 else "linear")
        if hasattr(m, "down") and not m.needs_base:
            svd = lowrank_svd(*m.factors(torch.float64), m.scale)
            source = "factors"
        elif getattr(m, "is_low_rank", False):
            svd = lowrank_svd(*m.lowrank(torch.float64))
            source = "factors"
        else:
            svd = None
            source = "dense"
        if svd is not None:
            k, exact = _keep(svd.s, rank, fro)
            u, s, vh = svd.truncated(exact)
        else:
            u, s, vh = _dense_svd(delta_matrix(m, w, name))
            k, exact = _keep(s, rank, fro)
        if kind == "linear" and hasattr(m, "down") and m.kind == "conv":
            kind, shape = "conv", tuple(m.weight_shape)
        if getattr(m, "kind", "") == "conv" and kind != "conv":
            raise UsageError(
                f"module {name}: the kernel size of this conv {m.label} update is only in the base",
                hint="pass the base model (--base BASE)",
            )
        modules[name] = _lora(u, s, vh, max(k, 1), shape, bool(getattr(m, "transposed", False)), kind, dtype)
        if k == 0:
            modules[name] = replace(modules[name], up=torch.zeros_like(modules[name].up))
        report.modules.append(LoweredModule(name, m.family, k, exact, _error(s, k), source))
    replacements: dict[str, torch.Tensor] = {}
    for key, t in adapter.replacements.items():
        module, _, suffix = key.rpartition(".")
        if reader is None or suffix != "weight" or t.ndim != 2 or module in modules or key not in reader.keys():
            replacements[key] = t
            report.kept_replacements.append(key)
            continue
        w = reader.get(key)
        if tuple(w.shape) != tuple(t.shape):
            replacements[key] = t
            report.kept_replacements.append(key)
            continue
        u, s, vh = _dense_svd(t.to(torch.float64) - w.to(torch.float64))
        k, exact = _keep(s, rank, fro)
        emb = key.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight"))
        if emb:  # an embedding LoRA's ΔW is (dim x num_embeddings): the transpose of the stored weight's
            u, vh = vh.T, u.T
        modules[module] = _lora(
            u,
            s,
            vh,
            max(k, 1),
            tuple(w.shape),
            False,
            "embedding" if emb else "linear",
            t.dtype if t.is_floating_point() else torch.float32,
        )
        report.modules.append(LoweredModule(module, "modules_to_save", k, exact, _error(s, k), "dense"))
    meta = {k: v for k, v in adapter.meta.items() if k not in ("config", "family")}
    meta["config"] = None
    from loratools.model.adapter import Adapter

    return Adapter(modules=modules, replacements=replacements, meta=meta), report


def lora_view(adapter: Adapter, command: str) -> Adapter:
    """``adapter`` with its LoHa/LoKr modules in their exact low-rank form (scale folded, alpha = rank), for
    the factor-space commands (resize, spectrum). Other families are refused in one line naming the module."""
    from dataclasses import replace

    from loratools.errors import UnsupportedError
    from loratools.model.adapter import LoraModule

    if all(isinstance(m, LoraModule) for m in adapter.modules.values()):
        return adapter  # plain LoRA already: its config (task type, the user's target_modules) still holds
    modules: dict[str, Any] = {}
    for name, m in adapter.modules.items():
        if isinstance(m, LoraModule):
            modules[name] = m
            continue
        if not m.is_low_rank:
            raise UnsupportedError(
                f"{command}: module {name} ({m.label}) is not low-rank without its base",
                hint="lower it first: loratools convert ADAPTER --to peft --as-lora --base BASE -o OUT",
            )
        up, down = m.lowrank(torch.float64)
        dtype = next(iter(m.tensors().values())).dtype
        shape = tuple(getattr(m, "weight_shape", None) or ())
        conv = len(shape) == 4
        modules[name] = LoraModule(
            down=(down.reshape(down.shape[0], *shape[1:]) if conv else down).to(dtype),
            up=(up.reshape(*up.shape, 1, 1) if conv else up).to(dtype),
            alpha=float(up.shape[1]),
            kind="conv" if conv else "linear",
        )
    meta = {k: v for k, v in adapter.meta.items() if k not in ("config", "family")}
    return replace(adapter, modules=modules, meta=meta)
