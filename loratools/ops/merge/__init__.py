"""The streaming merge, one way: plan (which base tensors change, validated in full) -> layout (shards,
byte ranges to copy, tensors to compute) -> factors (adapter tensors left in their files, read per module)
-> write (fp32 update, one cast, atomic publish). ``run`` picks the base kind's target (``targets/``) and
the options (``options.MergeOptions``) are one object for the CLI and the API; ``files`` decides what else of the
base folder belongs to the output."""

from __future__ import annotations

from loratools.ops.merge.options import MergeOptions
from loratools.ops.merge.run import merge
from loratools.ops.merge.summary import MergeSummary

__all__ = ["MergeOptions", "MergeSummary", "merge"]
