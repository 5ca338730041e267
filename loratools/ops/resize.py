"""``resize``: new per-module ranks by truncating the exact SVD of each ΔW, computed from the factors.

Each module's ΔW = s·B·A is decomposed in factor space (:mod:`loratools.model.lowrank`), a rule picks the rank,
and the kept σ are split as √σ between the new factors. The scale convention is kept: the new alpha is
s·r' (or s·√r' for rsLoRA), so the effective multiplier of every module is unchanged and per-module
ranks/alphas go to ``rank_pattern``/``alpha_pattern``. DoRA magnitudes and LoRA biases are carried
unchanged (with DoRA the direction W+ΔW changes, so the merged result is an approximation like ΔW).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.args.numeric_args import NON_NEGATIVE_INT, POSITIVE_INT, check_number, check_optional
from loratools.errors import UsageError

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter


@dataclass
class ResizeResult:
    """The resized adapter, one report row per input module, and where it was written (if it was)."""

    adapter: Adapter
    modules: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None
    rule: str = ""
    value: float = 0.0

    @property
    def dropped(self) -> list[str]:
        """Modules whose new rank is 0 (zero delta, or nothing left of the budget for them)."""
        return [m["name"] for m in self.modules if m["new_rank"] == 0]

    def to_dict(self) -> dict[str, Any]:
        old = sum(m["old_parameters"] for m in self.modules)
        new = sum(m["new_parameters"] for m in self.modules)
        energy = sum(m["norm"] ** 2 for m in self.modules)
        kept = sum((m["norm"] * m["retained_fro"]) ** 2 for m in self.modules)
        return {
            "rule": self.rule,
            "value": self.value,
            "output": str(self.output) if self.output else None,
            "modules": self.modules,
            "dropped": self.dropped,
            "parameters_before": old,
            "parameters_after": new,
            "retained_fro": (kept / energy) ** 0.5 if energy > 0 else 1.0,
        }


def _rule(rank: int | None, fro: float | None, ratio: float | None, cumulative: float | None, budget: int | None):
    given = {
        k: v
        for k, v in (("rank", rank), ("fro", fro), ("ratio", ratio), ("cumulative", cumulative), ("budget", budget))
        if v is not None
    }
    if len(given) != 1:
        raise UsageError(
            "give exactly one of --rank, --fro, --ratio, --cumulative, --budget"
            + (f" (got {', '.join('--' + k for k in given)})" if given else ""),
            hint="e.g. loratools resize adapter/ --rank 4 -o small/",
        )
    return next(iter(given.items()))


def resize(
    adapter: Adapter | str | Path,
    *,
    rank: int | None = None,
    fro: float | None = None,
    ratio: float | None = None,
    cumulative: float | None = None,
    budget: int | None = None,
    max_rank: int | None = None,
    conv_rank: int | None = None,
    output: str | Path | None = None,
    to: str | None = None,
    overwrite: bool = False,
    trust_tensors: bool = False,
    base: str | Path | None = None,
    kohya_prefix: str | None = None,
) -> ResizeResult:
    """Truncate every module of ``adapter`` (a path or an Adapter) by one rule; write it if ``output``.

    Rules: ``rank`` (the best rank-R approximation, Eckart–Young), ``fro`` (smallest rank keeping that
    Frobenius fraction), ``ratio`` (σ ≥ σ_max/ratio), ``cumulative`` (smallest rank whose σ sum reaches
    that fraction), ``budget`` (at most that many factor parameters Σ r·(out+in) over all modules,
    greedy on σ² per parameter). ``max_rank`` caps every module (never above its current rank);
    ``conv_rank`` fixes the rank of conv modules (their parameters count toward a budget). Modules
    left with rank 0 are dropped and listed in the report. ``base`` resolves kohya names (to leave kohya
    with ``to``); ``kohya_prefix`` names modules for a kohya output (``lora_te_``).
    """
    from loratools.model.lowrank import (
        allocate_budget,
        check_rule,
        module_svd,
        retained_fro,
        select_rank,
        truncate_module,
    )
    from loratools.ops._algebra_io import load, write

    rule, value = _rule(rank, fro, ratio, cumulative, budget)
    if rule == "budget":
        check_number("--budget", value, NON_NEGATIVE_INT)
    else:
        check_rule(rule, value)
    check_optional("--max-rank", max_rank, POSITIVE_INT)
    check_optional("--conv-rank", conv_rank, POSITIVE_INT)
    ad, path = load(adapter, base=base, trust_tensors=trust_tensors)
    from loratools.ops.lower import lora_view

    ad = lora_view(ad, "resize")  # LoHa/LoKr through their exact low-rank form; the output is plain LoRA
    if not ad.modules:
        raise UsageError(f"{path or 'adapter'}: has no LoRA modules to resize")

    svds = {name: module_svd(m) for name, m in ad.modules.items()}
    cost = {name: m.out_features + m.in_features for name, m in ad.modules.items()}
    caps = {name: min(m.rank, max_rank or m.rank, svds[name].rank) for name, m in ad.modules.items()}
    fixed: dict[str, int] = {}
    if conv_rank is not None:
        fixed = {n: min(conv_rank, caps[n]) for n, m in ad.modules.items() if m.kind == "conv"}

    if rule == "budget":
        left = int(value) - sum(fixed[n] * cost[n] for n in fixed)
        if left < 0:
            raise UsageError(f"--conv-rank {conv_rank} alone needs {int(value) - left} parameters, over the budget")
        free = [n for n in ad.modules if n not in fixed]
        new_ranks = allocate_budget({n: svds[n].s for n in free}, {n: cost[n] for n in free}, left, caps)
    else:
        new_ranks = {n: min(select_rank(svds[n].s, rule, value), caps[n]) for n in ad.modules if n not in fixed}
    new_ranks.update(fixed)

    modules = {}
    report = []
    for name, m in ad.modules.items():
        k = min(new_ranks[name], svds[name].rank)
        s = svds[name].s
        if k > 0:
            modules[name] = truncate_module(m, svds[name], k)
        report.append(
            {
                "name": name,
                "kind": m.kind,
                "old_rank": m.rank,
                "new_rank": k,
                "norm": float((s * s).sum() ** 0.5),
                "retained_fro": retained_fro(s, k),
                "old_parameters": m.rank * cost[name],
                "new_parameters": k * cost[name],
            }
        )
    if not modules:
        raise UsageError(
            f"{path or 'adapter'}: every module would be dropped ({rule} {value})",
            hint="raise the budget or the rank",
        )
    result = ResizeResult(
        adapter=replace(ad, modules=modules, meta=_result_meta(ad)), modules=report, rule=rule, value=value
    )
    if output is not None:
        params = {"rule": rule, "value": value, "max_rank": max_rank, "conv_rank": conv_rank}
        result.output = write(
            result.adapter,
            output,
            operation="resize",
            parameters=params,
            inputs={"adapter": path},
            to=to,
            overwrite=overwrite,
            kohya_prefix=kohya_prefix,
            base=base,
        )
    return result


def _result_meta(ad: Adapter) -> dict:
    """The input's meta without its config's declared ranks: they describe the input file, and the new
    ranks would read as a config/tensor disagreement (loratools.model.ambiguity) to the next command."""
    return {k: v for k, v in ad.meta.items() if k != "declared_ranks"}
