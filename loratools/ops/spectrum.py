"""``spectrum``: the singular values of every module's ΔW, from the factors, to choose a rank.

Per module: σ of s·B·A (descending), ‖ΔW‖_F, the effective rank exp(H(σ/Σσ)) and the smallest ranks
keeping 90/95/99% of the energy Σσ². ``plot`` draws the retained-energy curves (the ``plot`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter

ENERGY_LEVELS = (0.9, 0.95, 0.99)


def module_spectrum(name: str, module: Any) -> dict[str, Any]:
    """One module's row: rank, kind, σ, norm, effective rank, energy ranks."""
    from loratools.model.lowrank import effective_rank, energy_rank, module_svd

    s = module_svd(module).s
    return {
        "name": name,
        "kind": module.kind,
        "rank": module.rank,
        "shape": [module.out_features, module.in_features],
        "singular_values": [float(x) for x in s],
        "norm": float((s * s).sum() ** 0.5),
        "effective_rank": effective_rank(s),
        "energy_ranks": {f"{level:g}": energy_rank(s, level) for level in ENERGY_LEVELS},
    }


def spectrum(
    adapter: Adapter | str | Path,
    *,
    plot: str | Path | None = None,
    overwrite: bool = False,
    trust_tensors: bool = False,
) -> dict:
    """Singular values and rank summaries of every module of ``adapter``; a PNG at ``plot`` if given.

    An adapter whose config rank disagrees with its tensors is refused unless ``trust_tensors`` (its
    scale, and so every σ, is a guess: :mod:`loratools.model.ambiguity`).
    Returns ``{"modules": [...], "summary": {...}}`` (see docs/json.md).
    """
    from loratools.ops._algebra_io import load

    ad, path = load(adapter, trust_tensors=trust_tensors)
    from loratools.ops.lower import lora_view

    ad = lora_view(ad, "spectrum")  # LoHa/LoKr: the spectrum of their exact low-rank form
    rows = [module_spectrum(n, m) for n, m in ad.modules.items()]
    summary: dict[str, Any] = {"modules": len(rows), "ranks": sorted(ad.ranks())}
    for level in ENERGY_LEVELS:
        key = f"{level:g}"
        summary[f"max_rank_{key}"] = max((r["energy_ranks"][key] for r in rows), default=0)
    result = {"adapter": str(path) if path else None, "modules": rows, "summary": summary}
    if plot is not None:
        plot_energy(rows, plot, overwrite=overwrite, inputs=(path,) if path else ())
        result["plot"] = str(plot)
    return result


def plot_energy(rows: list[dict[str, Any]], target: str | Path, *, overwrite: bool = False, inputs=()) -> Path:  # noqa: ANN001
    """Retained energy (Σ_{i≤k}σ²/Σσ²) against rank k, one thin line per module, median in bold."""
    from loratools.errors import require
    from loratools.publishing.publish import atomic_output

    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    width = max((len(r["singular_values"]) for r in rows), default=1)
    curves = []
    for r in rows:
        s2 = np.asarray(r["singular_values"], dtype=np.float64) ** 2
        if s2.sum() <= 0:
            continue
        c = np.concatenate([[0.0], np.cumsum(s2) / s2.sum()])
        c = np.pad(c, (0, width + 1 - c.size), constant_values=1.0)
        curves.append(c)
        ax.plot(range(width + 1), c, color="tab:blue", alpha=0.25, linewidth=0.8)
    if curves:
        ax.plot(range(width + 1), np.median(np.stack(curves), 0), color="black", linewidth=2, label="median")
    for level in ENERGY_LEVELS:
        ax.axhline(level, color="tab:red", linestyle=":", linewidth=0.8)
        ax.text(width, level, f"{level:.0%}", va="bottom", ha="right", fontsize=8, color="tab:red")
    ax.set(
        xlabel="rank k",
        ylabel="retained energy Σσ²(≤k)/Σσ²",
        ylim=(0, 1.02),
        xlim=(0, width),
        title=f"Retained energy per module ({len(rows)} modules)",
    )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # ranks are whole numbers
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(target)
    import json

    from loratools.publishing.publish import METADATA_KEY, describe_input, provenance

    sources = {f"adapter{i}": describe_input(p) for i, p in enumerate(inputs)}
    record = provenance("spectrum", {"plot": str(path)}, sources)
    with atomic_output(path, overwrite=overwrite, inputs=inputs, directory=False, expected_bytes=1 << 20) as tmp:
        # the record in a tEXt chunk: --overwrite replaces only a plot that provably is ours
        fig.savefig(tmp, format="png", metadata={METADATA_KEY: json.dumps(record, sort_keys=True)})
    plt.close(fig)
    return path
