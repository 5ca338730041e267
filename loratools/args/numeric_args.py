"""Numeric arguments: the one check every number a user gives goes through (finite and in range).

The library functions call :func:`check_number` / :func:`check_weights` on their arguments, and the
CLI's ``Number`` parameter type (cli/options.py) calls the same :meth:`Range.problem`, so ``--weights
nan``, ``--scale inf`` or ``--rank 0`` are refused the same way by the API and by every command.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from loratools.errors import UsageError

#: the largest finite float32: every number ends up multiplying float32 tensors
FP32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Range:
    """The values a numeric argument may take: finite always, bounds optional, ends open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nonzero: bool = False

    def describe(self) -> str:
        """Words for the allowed values, as error messages show them ('a number in (0, 1]')."""
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            if abs(self.low) == FP32_MAX and abs(self.high) == FP32_MAX:
                text = f"{kind} within float32 range (|x| <= {FP32_MAX:.4g})"
            else:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text = f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = kind
        return text + (", not 0" if self.nonzero else "")

    def problem(self, value: object) -> str | None:
        """None when ``value`` is allowed, else why not ('must be a finite number in (0, 1], got nan')."""
        bad = f"must be {self.describe()}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return bad
        if isinstance(value, float) and not math.isfinite(value):
            return bad
        if self.integer and value != int(value):
            return bad
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return bad
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return bad
        if self.nonzero and value == 0:
            return bad
        return None


#: ranks, batch sizes, repeat counts
POSITIVE_INT = Range(low=1, integer=True)
#: seeds, warm-up runs, parameter budgets
NON_NEGATIVE_INT = Range(low=0, integer=True)
#: fractions of energy or of entries kept
FRACTION = Range(low=0.0, high=1.0, low_open=True)
#: relative tolerances
NON_NEGATIVE = Range(low=0.0, high=FP32_MAX)
#: alphas
POSITIVE = Range(low=0.0, high=FP32_MAX, low_open=True)
#: σ_max / σ ratios
AT_LEAST_ONE = Range(low=1.0, high=FP32_MAX)
#: adapter weights (negative subtracts, 0 leaves an adapter out)
WEIGHT = Range(low=-FP32_MAX, high=FP32_MAX)
#: factors every ΔW is multiplied by (0 would remove the adapter)
SCALE = Range(low=-FP32_MAX, high=FP32_MAX, nonzero=True)


def check_number(name: str, value: float | int, allowed: Range) -> float | int:
    """Return ``value`` if ``allowed`` holds it; else raise UsageError naming the option ``name``."""
    problem = allowed.problem(value)
    if problem is not None:
        raise UsageError(f"{name} {problem}", hint=f"give {name} {allowed.describe()}")
    return int(value) if allowed.integer else value


def check_optional(name: str, value: float | int | None, allowed: Range) -> float | int | None:
    """:func:`check_number` for an argument that may be left out (None)."""
    return None if value is None else check_number(name, value, allowed)


def check_weights(weights: Sequence[float] | None, count: int, name: str = "--weights") -> list[float]:
    """One finite float32 weight per adapter (default 1 each); UsageError naming ``name`` otherwise."""
    if weights is None:
        return [1.0] * count
    out = [check_number(name, w, WEIGHT) for w in weights]
    if len(out) != count:
        raise UsageError(f"got {len(out)} weights for {count} adapters", hint=f"give one {name} value per adapter")
    return [float(w) for w in out]
