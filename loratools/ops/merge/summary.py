"""What a merge wrote, whatever the base (checkpoint, quantized, GGUF): one summary and one JSON shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.ops.verify import VerifyReport


@dataclass
class MergeSummary:
    """What a merge wrote."""

    output: Path
    modules_merged: int
    tensors_changed: int
    tensors_written: int
    bytes_written: int
    seconds: float
    files: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    verify: VerifyReport | None = None
    #: weight files / exports of the base folder not copied: they hold the unmerged base
    left_out: list[str] = field(default_factory=list)
    #: a quantized base: its scheme and, with --requantize/--reference, per-module numbers (QuantReport)
    quant: Any = None
    #: a GGUF base: touched tensors written in another type (K/I-quants as F16); None for other bases
    retyped: list[str] | None = None
    #: the outcome of a verification that keeps no per-tensor report (a GGUF output read back)
    verified: bool | None = None
    #: one line each for the user: what the merge wrote differently from the base (a dtype) and why
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "modules_merged": self.modules_merged,
            "tensors_changed": self.tensors_changed,
            "tensors_written": self.tensors_written,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "files": self.files,
            "untied": self.untied,
            "verified": self.verified if self.verify is None else self.verify.verified,
            "left_out": self.left_out,
            **({"quantized_base": self.quant.to_dict()} if self.quant is not None else {}),
            **({"retyped": self.retyped} if self.retyped is not None else {}),
            **({"notes": self.notes} if self.notes else {}),
        }
