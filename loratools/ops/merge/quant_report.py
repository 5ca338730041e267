"""What a merge into a quantized base does to each update, in numbers.

- ``rho`` (with ``--requantize``): the share of an update ΔW that survives requantization,
  ρ = ⟨Q(W+ΔW) − Q(W), ΔW⟩ / ‖ΔW‖², with Q(W) = deq(Wq) the weights the adapter was trained on.
  ρ ≈ 1: the update survives; ρ ≈ 0: requantization rounded it away.
- ``gap`` (with ``--reference BASE16``): ‖W16 − deq(Wq)‖ / ‖ΔW‖, how far merging into the 16-bit base
  lands from what a QLoRA adapter was trained against, in units of the update itself.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

#: below this share of an update, requantization is said to round it away
RHO_WARN = 0.5
#: gaps (in units of ‖ΔW‖) above which the 16-bit base is the wrong place for a QLoRA adapter
GAP_LARGE = 1.0
GAP_SMALL = 0.1


@dataclass
class ModuleRow:
    """One merged module's numbers (None where the measurement was not asked for)."""

    key: str
    scheme: str | None
    delta_norm: float
    rho: float | None = None
    gap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.key,
            "scheme": self.scheme,
            "delta_norm": self.delta_norm,
            "rho": _round(self.rho),
            "gap": _round(self.gap),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


@dataclass
class QuantReport:
    """The base's quantization, where the merge went, and per-module rho / gap."""

    scheme: str | None
    output: str  # "16-bit" | "requantized"
    merged_into: str  # "quantized" (deq(Wq)) | "reference"
    quantization: dict[str, Any] = field(default_factory=dict)
    rows: list[ModuleRow] = field(default_factory=list)

    def worst(self, attr: str, n: int = 5) -> list[ModuleRow]:
        """The ``n`` worst modules: lowest rho, or largest gap."""
        rows = [r for r in self.rows if getattr(r, attr) is not None]
        return sorted(rows, key=lambda r: getattr(r, attr), reverse=attr == "gap")[:n]

    def _median(self, attr: str) -> float | None:
        vals = [getattr(r, attr) for r in self.rows if getattr(r, attr) is not None]
        return statistics.median(vals) if vals else None

    @property
    def rounded_away(self) -> list[ModuleRow]:
        return [r for r in self.rows if r.rho is not None and r.rho < RHO_WARN]

    @property
    def warnings(self) -> list[str]:
        out = []
        lost = self.rounded_away
        if lost:
            names = ", ".join(r.key for r in self.worst("rho", 3))
            out.append(
                f"requantization rounds away most of the update of {len(lost)} of {len(self.rows)} modules "
                f"(rho < {RHO_WARN}; worst: {names}); merge without --requantize to keep the update in 16-bit"
            )
        return out

    @property
    def recommendation(self) -> str | None:
        """Which base to merge into, from the gaps (None without a reference)."""
        med = self._median("gap")
        if med is None:
            return None
        if med >= GAP_LARGE:
            return (
                f"merge into the quantized base (the default): the 16-bit base differs from the weights the "
                f"adapter was trained against by {med:.3g}x the update (median), so --into reference would "
                "add more change than the adapter itself"
            )
        if med <= GAP_SMALL:
            return (
                f"either base works: the 16-bit base is within {med:.3g}x the update of the dequantized one "
                "(median); --into reference keeps full precision"
            )
        return (
            f"prefer the quantized base (the default): --into reference would add W16 - deq(Wq), "
            f"{med:.3g}x the update (median)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "output": self.output,
            "merged_into": self.merged_into,
            "quantization": self.quantization,
            "median_rho": _round(self._median("rho")),
            "median_gap": _round(self._median("gap")),
            "modules": [r.to_dict() for r in self.rows],
            "warnings": self.warnings,
            "recommendation": self.recommendation,
        }


def share_surviving(requantized: Any, dequantized: Any, delta: Any) -> float:
    """ρ = ⟨Q(W+ΔW) − Q(W), ΔW⟩ / ‖ΔW‖² (fp32 tensors of one shape); 1.0 for a zero update."""
    import torch

    d = delta.reshape(-1).to(torch.float64)
    den = float(d.dot(d))
    if den == 0.0:
        return 1.0
    moved = (requantized.reshape(-1).to(torch.float64) - dequantized.reshape(-1).to(torch.float64)).dot(d)
    return float(moved) / den


def gap_ratio(reference: Any, dequantized: Any, delta_norm: float) -> float:
    """‖W16 − deq(Wq)‖ / ‖ΔW‖ (inf for a zero update over differing bases)."""
    import torch

    diff = float(torch.linalg.vector_norm(reference.to(torch.float64) - dequantized.to(torch.float64)))
    if delta_norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / delta_norm
