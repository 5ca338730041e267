"""validate: what is wrong with an adapter, one finding each. ``checks`` (structure, config vs tensors,
NaN/Inf), ``base`` (fit to a base checkpoint), ``serving`` (what each serving runtime would reject, rules
as data in ``serving_rules.json``), ``findings`` (the report they share)."""

from __future__ import annotations

from loratools.ops.validate.checks import validate
from loratools.ops.validate.findings import Finding, ValidationReport

__all__ = ["Finding", "ValidationReport", "validate"]
