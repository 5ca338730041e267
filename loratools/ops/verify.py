"""Prove that a merged checkpoint (ours or any tool's) holds exactly the adapters, tensor by tensor.

For each tensor an adapter touches, the stored value is compared with W + Σ w_i·scale_i·B_i·A_i
computed in fp32, within what the stored dtype can represent: ``eps·(|W| + |W'|)`` per element (one
rounding step of each operand, since tools round in different orders) plus fp32 summation noise.
A failing update is explained by fitting it to the adapters' rank-1 components: all ≈0 is "not
applied", all ≈-1 "sign flipped", all ≈c "scaling mismatch" (ratio c), a mix of 1 and 0 "partial
rank"; an update that matches the transpose is "transposed". Untouched tensors must be unchanged;
a tied embedding that carries the head's update is "tied weight changed".
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.args.numeric_args import check_weights
from loratools.errors import UsageError

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter
    from loratools.ops.merge.plan import MergePlan, TensorJob

EPS = {"F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7, "F64": 2.0**-52}
FAILURES = (
    "not_applied",
    "scaling_mismatch",
    "sign_flipped",
    "transposed",
    "partial_rank",
    "tied_weight_changed",
    "untouched_changed",
    "below_precision",
    "missing",
    "shape_mismatch",
    "unexpected",
    "wrong_update",
)


@dataclass
class Finding:
    """The check of one tensor: ``status`` is ``ok`` or one of :data:`FAILURES`."""

    tensor: str
    status: str
    detail: str = ""
    modules: list[str] = field(default_factory=list)
    max_error: float | None = None
    tolerance: float | None = None
    ratio: float | None = None


@dataclass
class VerifyReport:
    merged: str
    base: str
    tensors_checked: int = 0
    modules_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.status != "ok"]

    @property
    def verified(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        bad = self.failures
        if not bad:
            return f"verified: {self.modules_checked} modules, {self.tensors_checked} tensors"
        first = "; ".join(f"{f.tensor}: {f.status.replace('_', ' ')} ({f.detail})" for f in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"{len(bad)} of {self.tensors_checked} tensors failed: {first}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "merged": self.merged,
            "base": self.base,
            "tensors_checked": self.tensors_checked,
            "modules_checked": self.modules_checked,
            "failures": [asdict(f) for f in self.failures],
            "touched": [asdict(f) for f in self.findings if f.modules],
        }


def verify(
    merged: str | Path,
    base: str | Path | CheckpointReader,
    adapters: Sequence[str | Path | Adapter],
    weights: Sequence[float] | None = None,
    *,
    include: str | None = None,
    exclude: str | None = None,
    trust_tensors: bool = False,
    expand_base: bool = False,
) -> VerifyReport:
    """Check that ``merged`` equals ``base`` with ``adapters`` (scaled by ``weights``) merged in.

    ``include``/``exclude`` (regexes over module names) pick the adapters' modules the way ``merge``
    took them, so a ``merge --include`` output verifies with the same ``--include``. An adapter whose
    config rank disagrees with its tensors is refused unless ``trust_tensors``, as ``merge`` refuses it:
    what it should have changed is a guess (:mod:`loratools.model.ambiguity`). ``expand_base``: the merge
    widened the base's input layer for a Flux control LoRA (``merge --expand-base``).
    """
    from loratools.checkpoint.reader import CheckpointReader, open_checkpoint
    from loratools.formats.dit.bfl_control import expanding_base

    weights = check_weights(weights, len(adapters))
    own = not isinstance(base, CheckpointReader)
    breader = open_checkpoint(base) if own else base
    mreader = open_checkpoint(merged)
    try:
        # off: leave the context as it is (merge --expand-base --verify runs this inside its own widening)
        with expanding_base() if expand_base else contextlib.nullcontext():
            return _verify(merged, breader, mreader, adapters, weights, include, exclude, trust_tensors)
    finally:
        mreader.close()
        if own:
            breader.close()


def _verify(merged, breader, mreader, adapters, weights, include, exclude, trust_tensors) -> VerifyReport:  # noqa: ANN001
    from loratools.formats.adapter_io import load_adapter
    from loratools.model.ambiguity import require_unambiguous
    from loratools.ops.merge.plan import build_plan
    from loratools.ops.merge.write import BaseBytes

    loaded = [a if not isinstance(a, str | Path) else load_adapter(a, base=breader) for a in adapters]
    for a in loaded:
        require_unambiguous(a, trust_tensors=trust_tensors)
    if include or exclude:
        loaded = [a.select(include, exclude) for a in loaded]
        if not any(a.modules or a.replacements for a in loaded):
            raise UsageError("no adapter module is left to verify", hint="check --include / --exclude")
    plan = build_plan(breader, loaded, weights)
    report = VerifyReport(merged=str(merged), base=str(breader.root), modules_checked=plan.modules_merged)
    bbytes, mbytes = BaseBytes(breader), BaseBytes(mreader)
    try:
        labels = [_label(a, i) for i, a in enumerate(loaded)]
        _check_all(report, plan, breader, mreader, bbytes, mbytes, labels if len(loaded) > 1 else None)
    finally:
        bbytes.close()
        mbytes.close()
    return report


def _label(adapter: Adapter, index: int) -> str:
    """'adapter 2 (b/)': how a finding names one of several adapters (1-based, in --adapter order)."""
    return f"adapter {index + 1} ({adapter.meta.get('source') or 'in memory'})"


def _check_all(report, plan: MergePlan, breader, mreader, bbytes, mbytes, labels=None) -> None:  # noqa: ANN001
    from loratools.ops.merge.plan import _is_head, tied_keys

    m_emb = tied_keys(mreader)
    keys = list(dict.fromkeys([*breader.keys(), *plan.jobs]))
    mkeys = set(mreader.keys())
    for key in keys:
        mkey = key if key in mkeys else None
        if m_emb and _is_head(key):
            mkey = m_emb  # the merged model reads its head from the tied embedding
        if mkey is None:
            if _is_head(key) and key not in plan.jobs and key not in breader:
                continue
            report.findings.append(Finding(key, "missing", "the merged checkpoint has no such tensor"))
            continue
        report.tensors_checked += 1
        job = plan.jobs.get(key)
        actual = mbytes.get(mkey)
        report.findings.append(_check(key, job, actual, mreader.info(mkey).dtype, plan, bbytes, m_emb, labels))
    for extra in sorted(mkeys - set(keys)):
        report.findings.append(Finding(extra, "unexpected", "the base and the adapters have no such tensor"))


def _start(job: TensorJob | None, key: str, bbytes) -> torch.Tensor:  # noqa: ANN001
    import torch

    if job is not None and job.replacement is not None:
        return job.replacement.to(torch.float32)
    return bbytes.get(job.source if job is not None and job.source else key)


def _check(key, job, actual, mdtype, plan, bbytes, m_emb, labels=None) -> Finding:  # noqa: ANN001
    import torch

    from loratools.ops.merge.plan import compute

    start = _start(job, key, bbytes)
    mods = [c.module for c in job.deltas + job.biases] if job is not None else []
    if tuple(actual.shape) != tuple(job.shape if job is not None else start.shape):
        want = job.shape if job is not None else tuple(start.shape)
        return Finding(key, "shape_mismatch", f"stored {tuple(actual.shape)}, expected {want}", mods)
    if job is None or job.is_copy:
        expected = start.to(actual.dtype)
        if torch.equal(actual, expected):
            return Finding(key, "ok")
        diff = float((actual.float() - expected.float()).abs().max())
        partner = _tied_partner(key, plan, actual, start, bbytes) if m_emb or plan.untied else None
        if partner:
            return Finding(key, "tied_weight_changed", partner, mods, max_error=diff)
        return Finding(key, "untouched_changed", f"no adapter touches it, but it changed by up to {diff:.3g}", mods)
    start32 = start.float()
    expected = compute(job, start if job.replacement is None else None)
    got = actual.float()
    eps = EPS.get(mdtype, 2.0**-7)
    exp_delta = expected - start32
    rank = sum(c.lora.rank for c in job.deltas) or 1
    floor = 4 * rank * 2.0**-23 * float(exp_delta.abs().max()) + 1e-30
    tol = eps * (start32.abs() + expected.abs()) + floor
    err = (got - expected).abs()
    ok = bool((err <= tol).all())
    max_err, max_tol = float(err.max()) if err.numel() else 0.0, float(tol.max()) if tol.numel() else 0.0
    act_delta = got - start32
    if ok:
        if float(exp_delta.abs().max()) > 0 and not bool(act_delta.any()):
            step = float((eps * start32.abs()).max())
            return Finding(
                key,
                "below_precision",
                f"the update (max |ΔW| {float(exp_delta.abs().max()):.3g}) is below the {mdtype} rounding step "
                f"(up to {step:.3g}) at these weights; nothing of it is stored (merge with --dtype fp32)",
                mods,
                max_err,
                max_tol,
            )
        return Finding(key, "ok", "", mods, max_err, max_tol)
    status, detail, ratio = _diagnose(job, act_delta, exp_delta, tol, labels)
    return Finding(key, status, detail, mods, max_err, max_tol, ratio)


def _tied_partner(key, plan, actual, start, bbytes) -> str | None:  # noqa: ANN001
    """If ``key`` changed by exactly its tied partner's update, say so."""
    from loratools.ops.merge.plan import _is_head, compute

    for other, j in plan.jobs.items():
        if other == key or not _is_head(other) or j.is_copy:
            continue
        src = bbytes.get(j.source) if j.replacement is None else None
        want = compute(j, src)
        if want.shape == actual.shape and bool(((actual.float() - want).abs() <= 2**-6 * (want.abs() + 1e-3)).all()):
            return f"it carries {other}'s update: the merged model ties {other} to it, so the input embeddings changed"
    return None


def _diagnose(job, act: torch.Tensor, exp: torch.Tensor, tol: torch.Tensor, labels=None) -> tuple[str, str, float | None]:  # noqa: ANN001, E501
    import torch

    norm_exp = float(exp.norm())
    if not bool((act.abs() > tol).any()):
        return "not_applied", "the stored weight equals the base: the update is missing", 0.0
    if job.biases and not job.deltas:
        ratio = float((act * exp).sum() / max(norm_exp**2, 1e-30))
        return _by_ratio([ratio], 1.0, "bias")
    if job.dora is not None:
        return (
            "wrong_update",
            f"the DoRA-merged weight does not match (max error {float((act - exp).abs().max()):.3g})",
            None,
        )
    family = next((c.lora.label for c in job.deltas if not hasattr(c.lora, "factors")), None)
    if family is not None:  # LoHa, LoKr, OFT, BOFT, IA3: no factor-space fit, the dense check decides
        err = float((act - exp).abs().max())
        return "wrong_update", f"the {family}-merged weight does not match (max error {err:.3g})", None
    first = job.deltas[0].lora
    m = first.from_weight_layout(act)
    comps = [(c.coefficient, _full_rows(c, m.shape[0]), c.lora.factors(torch.float32)[1]) for c in job.deltas]
    u = torch.cat([coef * b for coef, b, _ in comps], dim=1)
    v = torch.cat([a for _, _, a in comps], dim=0)
    gram = (u.T @ u) * (v @ v.T)
    rhs = ((u.T @ m) * v).sum(dim=1)
    coeffs = torch.linalg.lstsq(gram.double(), rhs.double().unsqueeze(1)).solution.squeeze(1).float()
    res2 = float(m.norm() ** 2 - 2 * (coeffs * rhs).sum() + coeffs @ gram @ coeffs)
    rel = (max(res2, 0.0) ** 0.5) / max(float(m.norm()), 1e-30)
    if rel < 0.05:
        if labels:  # several adapters: say which one is off, and by what
            return _per_adapter(job, coeffs.tolist(), labels)
        return _by_ratio(coeffs.tolist(), 1.0, "component")
    if m.shape[0] == m.shape[1]:
        exp_m = first.from_weight_layout(exp)
        if float((m - exp_m.T).norm()) < 0.05 * max(norm_exp, 1e-30):
            return "transposed", "the update is stored transposed (rows and columns swapped)", None
    return "wrong_update", f"the update does not match the adapter (relative misfit {rel:.2f})", None


def _per_adapter(job, coeffs: list[float], labels: list[str]) -> tuple[str, str, float | None]:  # noqa: ANN001
    """The fitted rank-1 coefficients grouped by adapter: which adapter's update is off, and how.

    A coefficient c means the stored update holds c times what the verified weight w asks for, i.e. the
    adapter was merged with weight c·w: one adapter off gets that adapter's own status and ratio."""
    groups: dict[int, list[float]] = {}
    weights: dict[int, float] = {}
    at = 0
    for c in job.deltas:
        groups.setdefault(c.adapter, []).extend(coeffs[at : at + c.lora.rank])
        weights[c.adapter] = c.weight
        at += c.lora.rank
    off = []
    for i, cs in groups.items():
        status, detail, ratio = _by_ratio(cs, 1.0, "component")
        if status == "wrong_update" and "direction and scale" in detail:
            continue  # right coefficient, only rounding: not this adapter's fault alone
        w = weights[i]
        text = f"{labels[i]}: {detail}"
        if ratio is not None:
            text += f" (coefficient {ratio:.4g} where 1 was expected: merged with weight {ratio * w:.4g}, not {w:.4g}?)"
        off.append((status, text, ratio))
    if not off:
        return _by_ratio(coeffs, 1.0, "component")
    if len(off) == 1:
        return off[0]
    return "wrong_update", "; ".join(d for _, d, _ in off), None


def _full_rows(c, rows: int) -> torch.Tensor:  # noqa: ANN001
    """B over all rows of the tensor (zeros outside a fused part's rows)."""
    import torch

    up = c.lora.factors(torch.float32)[0]
    if c.rows is None:
        return up
    full = torch.zeros(rows, up.shape[1])
    full[c.rows[0] : c.rows[1]] = up
    return full


def _by_ratio(coeffs: list[float], want: float, what: str) -> tuple[str, str, float | None]:
    near = lambda x, y: abs(x - y) <= 0.02 * max(abs(y), 1.0)  # noqa: E731
    mean = sum(coeffs) / len(coeffs)
    if all(near(c, 0.0) for c in coeffs):
        return "not_applied", "the update is missing", 0.0
    if all(near(c, -want) for c in coeffs):
        return "sign_flipped", "the update was subtracted instead of added", -1.0
    if all(near(c, want) for c in coeffs):  # right scale, yet outside the tolerance: not a scaling defect
        return (
            "wrong_update",
            "the update has the adapter's direction and scale but differs from it by more than rounding "
            "(merged from a rounded copy of the adapter, such as bf16 factors, or in lower precision?)",
            None,
        )
    if all(near(c, mean) for c in coeffs):
        return "scaling_mismatch", f"the update is scaled by {mean:.4g}× what the adapter says", mean
    applied = sum(near(c, want) for c in coeffs)
    if all(near(c, want) or near(c, 0.0) for c in coeffs):
        return "partial_rank", f"only {applied} of {len(coeffs)} rank-1 {what}s were applied", None
    return "wrong_update", f"{what} coefficients {', '.join(f'{c:.3g}' for c in coeffs[:6])} (expected {want})", None
