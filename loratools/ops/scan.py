"""``validate --scan``: per-module spectral figures from the factors, and the modules that stand out.

Every figure comes from the factors B (out×r) and A (r×in) through r×r Gram matrices; the dense
ΔW = s·B·A is never formed. With G_A = A·Aᵀ and G_B = Bᵀ·B, the squared singular values of ΔW are the
eigenvalues of s²·G_A^½·G_B·G_A^½, the energy of output row i is s²·b_i·G_A·b_iᵀ and that of input
column j is s²·a_jᵀ·G_B·a_j. Per module:

- ``fro_norm`` ‖ΔW‖_F; ``stable_rank`` ‖ΔW‖_F²/‖ΔW‖_2² (1 for a rank-1 update, up to r);
- ``spectral_entropy`` the entropy of σᵢ²/Σσ², divided by log r (0: one direction, 1: all equal);
- ``top_row_share`` / ``top_col_share`` the largest single output row's / input column's share of ‖ΔW‖_F²;
- ``kurtosis`` the larger excess kurtosis of B's and A's entries (0 for Gaussian factors).

Modules are grouped into families of same-named modules across depth (``model.layers.*.self_attn.q_proj``).
In a family of at least :data:`MIN_FAMILY` modules, each figure (log-scaled where positive) has its
depth trend removed by a Theil–Sen line; a figure whose residual lies more than ``threshold`` robust
z-units (median/MAD, with a floor) from the family's stands out, and a module is flagged with its
figures when two figures stand out, or one by more than twice the threshold. Structural red flags are reported
too: full embedding / output-head matrices shipped with the adapter, declared ranks that differ from the
tensors, and pickle or executable files next to the adapter. The scan reports; a flag asks for review,
it is not a verdict on anyone's intent.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter, LoraModule

#: robust z beyond which a module is flagged
THRESHOLD = 6.0
#: smallest family whose members are compared with each other
MIN_FAMILY = 5
#: (metric, log-scaled) in the order they are reported
METRICS = (
    ("fro_norm", True),
    ("stable_rank", True),
    ("spectral_entropy", False),
    ("top_row_share", True),
    ("top_col_share", True),
    ("kurtosis", True),
)
#: suffixes of files that can run code when loaded or executed
_CODE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".py", ".sh", ".exe", ".dll", ".so", ".dylib")
_HEADS = re.compile(r"(^|\.)(lm_head|embed_tokens|wte|word_embeddings|embed_in|embed_out|shared|output)\.weight$")
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


@dataclass
class ModuleFigures:
    """The scan's figures for one module and the reasons it was flagged (empty when it was not)."""

    module: str
    family: str
    depth: int
    rank: int
    fro_norm: float
    stable_rank: float
    spectral_entropy: float
    top_row_share: float
    top_col_share: float
    kurtosis: float
    flags: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ScanReport:
    """Figures per module, outliers within families, and structural red flags."""

    modules: list[ModuleFigures]
    families: dict[str, int]
    red_flags: list[dict[str, Any]]
    threshold: float = THRESHOLD
    skipped: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[ModuleFigures]:
        return [m for m in self.modules if m.flags]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "min_family": MIN_FAMILY,
            "families": self.families,
            "flagged": [m.module for m in self.flagged],
            "red_flags": self.red_flags,
            "skipped": self.skipped,
            "modules": [asdict(m) for m in self.modules],
        }


def module_figures(module: LoraModule) -> dict[str, float] | None:
    """The spectral figures of one module (see the module docstring), in float64, from r×r Grams.

    None when the factors hold NaN/Inf or their Grams overflow (``validate`` reports those itself).
    """
    import torch

    up, down = module.factors(torch.float64)
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        return None
    try:
        return _figures(module, up, down)
    except (RuntimeError, ValueError, ZeroDivisionError, OverflowError):  # eigh on overflowed Grams
        return None


def _figures(module: LoraModule, up: torch.Tensor, down: torch.Tensor) -> dict[str, float] | None:
    import torch

    s2 = float(module.scale) ** 2
    ga, gb = down @ down.T, up.T @ up
    evals, vecs = torch.linalg.eigh(ga)
    root = (vecs * evals.clamp(min=0).sqrt()) @ vecs.T
    core = root @ gb @ root
    sig2 = torch.linalg.eigvalsh((core + core.T) / 2).clamp(min=0) * s2
    total = float(sig2.sum())
    rows = ((up @ ga) * up).sum(1).clamp(min=0) * s2
    cols = ((down.T @ gb) * down.T).sum(1).clamp(min=0) * s2
    r = module.rank
    if not math.isfinite(total):
        return None
    if total <= 0:
        return dict.fromkeys(("fro_norm", "stable_rank", "spectral_entropy", "top_row_share", "top_col_share"), 0.0) | {
            "kurtosis": 0.0
        }
    p = sig2 / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(r) if r > 1 else 0.0
    return {
        "fro_norm": math.sqrt(total),
        "stable_rank": total / float(sig2.max()),
        "spectral_entropy": entropy,
        "top_row_share": float(rows.max()) / total,
        "top_col_share": float(cols.max()) / total,
        "kurtosis": max(_kurtosis(up), _kurtosis(down)),
    }


def _kurtosis(t: torch.Tensor) -> float:
    x = t.reshape(-1)
    x = x - x.mean()
    m2 = float((x * x).mean())
    return float((x**4).mean()) / (m2 * m2) - 3.0 if m2 > 0 else 0.0


def family_of(name: str) -> tuple[str, tuple[int, ...]]:
    """``(family, indices)``: the name with its numeric components replaced by ``*``, and those numbers."""
    return _INDEX.sub("*", name), tuple(int(i) for i in _INDEX.findall(name))


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _residuals(depths: list[int], values: list[float]) -> list[float]:
    """Values minus a Theil–Sen line over depth (robust to the outliers it is meant to expose)."""
    slopes = [
        (values[j] - values[i]) / (depths[j] - depths[i])
        for i in range(len(depths))
        for j in range(i + 1, len(depths))
        if depths[j] != depths[i]
    ]
    slope = _median(slopes) if slopes else 0.0
    intercept = _median([v - slope * d for d, v in zip(depths, values, strict=True)])
    return [v - (intercept + slope * d) for d, v in zip(depths, values, strict=True)]


def _flag_family(members: list[ModuleFigures], threshold: float) -> None:
    depths = [m.depth for m in members]
    for metric, logged in METRICS:
        raw = [float(getattr(m, metric)) for m in members]
        shift = 3.0 if metric == "kurtosis" else 0.0  # excess kurtosis >= -2: log of the plain kurtosis
        values = [math.log(max(v + shift, 1e-30)) if logged else v for v in raw]
        res = _residuals(depths, values)
        center = _median(res)
        mad = _median([abs(x - center) for x in res]) * 1.4826
        spread = max(mad, 0.1 if logged else 0.03)  # a floor: near-identical members are not outliers
        for m, x, v in zip(members, res, raw, strict=True):
            z = (x - center) / spread
            if abs(z) > threshold:
                m.flags.append({"metric": metric, "value": v, "family_median": _median(raw), "z": round(z, 1)})
    for m in members:  # one figure alone (a max over rows, say) wanders by chance: ask for two, or one far out
        if len(m.flags) == 1 and abs(m.flags[0]["z"]) <= 2 * threshold:
            m.flags.clear()


def _red_flags(adapter: Adapter, path: Path | None) -> list[dict[str, Any]]:
    flags: list[dict[str, Any]] = []
    files = [f for f in adapter.meta.get("files") or [] if not str(f).endswith(".json")]
    where = f"{files[0] if files else (path or 'adapter')}: "
    for key, t in sorted(adapter.replacements.items()):
        if _HEADS.search(key) and t.ndim == 2:
            flags.append(
                {
                    "code": "scan_full_matrix",
                    "module": key.rpartition(".")[0],
                    "message": f"{where}ships the full matrix {key} {list(t.shape)}: it replaces the base's "
                    "weights outright, not a low-rank update",
                }
            )
    declared = adapter.meta.get("declared_ranks") or {}
    dim = (adapter.meta.get("metadata") or {}).get("ss_network_dim")
    for name, m in sorted(adapter.modules.items()):
        want = declared.get(name)
        if want is None and dim is not None and str(dim).isdigit() and m.kind != "conv":
            want = int(dim)
        if want is not None and int(want) != m.rank:
            flags.append(
                {
                    "code": "scan_rank_declared",
                    "module": name,
                    "message": f"{where}module {name}: declared rank {want}, tensor rank {m.rank}",
                }
            )
    folder = path if path is not None and path.is_dir() else (path.parent if path is not None else None)
    if folder is not None and folder.is_dir():
        for f in sorted(folder.iterdir()):
            if not f.is_file() or f.name.startswith("."):
                continue
            code_like = f.suffix.lower() in _CODE_SUFFIXES
            if code_like or os.access(f, os.X_OK):
                what = "a pickle or code file" if code_like else "an executable file"
                flags.append(
                    {
                        "code": "scan_foreign_file",
                        "module": None,
                        "message": f"{f}: {what} next to the adapter; loratools never runs it, other tools might",
                    }
                )
    return flags


def scan_adapter(adapter: Adapter | str | Path, *, threshold: float = THRESHOLD) -> ScanReport:
    """Figures per module, family outliers (robust z above ``threshold``) and structural red flags.

    Example::

        >>> from loratools.ops.scan import scan_adapter
        >>> report = scan_adapter("fixtures/peft/llama-lora")
        >>> [m.module for m in report.flagged]
        []
    """
    from loratools.formats.adapter_io import load_adapter
    from loratools.model.adapter import Adapter
    from loratools.publishing.hub import resolve_path

    path = None
    if not isinstance(adapter, Adapter):
        path = resolve_path(adapter, "adapter")
        adapter = load_adapter(path)
    elif adapter.meta.get("files"):
        path = Path(adapter.meta["files"][-1])
    figures: list[ModuleFigures] = []
    skipped: list[str] = []
    groups: dict[str, list[tuple[tuple[int, ...], str]]] = {}
    for name in adapter.modules:
        fam, idx = family_of(name)
        groups.setdefault(fam, []).append((idx, name))
    for fam, members in sorted(groups.items()):
        for depth, (_, name) in enumerate(sorted(members)):
            m = adapter.modules[name]
            values = module_figures(m)
            if values is None:
                skipped.append(name)
                continue
            figures.append(ModuleFigures(name, fam, depth, m.rank, **values))
    by_family: dict[str, list[ModuleFigures]] = {}
    for f in figures:
        by_family.setdefault(f.family, []).append(f)
    for members in by_family.values():
        if len(members) >= MIN_FAMILY:
            _flag_family(members, threshold)
    return ScanReport(
        modules=figures,
        families={k: len(v) for k, v in sorted(by_family.items())},
        red_flags=_red_flags(adapter, path),
        threshold=threshold,
        skipped=skipped,
    )


def scan_findings(report: ScanReport) -> list[tuple[str | None, str, str]]:
    """``(module, code, message)`` warnings for ``validate``: one per flagged module and red flag."""
    out: list[tuple[str | None, str, str]] = []
    for m in report.flagged:
        parts = [
            f"{f['metric']} {f['value']:.4g} (family median {f['family_median']:.4g}, robust z {f['z']:+.1f})"
            for f in m.flags
        ]
        out.append(
            (
                m.module,
                "scan_outlier",
                f"module {m.module} stands out among the {report.families[m.family]} modules of {m.family}: "
                + "; ".join(parts),
            )
        )
    out += [(f["module"], f["code"], f["message"]) for f in report.red_flags]
    return out
