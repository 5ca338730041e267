"""Every option of a merge in one object, shared by the CLI and the API, and the one refusal of options a base
kind does not take (each target lists what it accepts; the message is built from that list)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loratools.errors import UsageError

Progress = Callable[[int], contextlib.AbstractContextManager[Callable[[int], None]]]


@dataclass(frozen=True)
class MergeOptions:
    """What ``merge(base, adapters, output, **options)`` takes besides its three arguments.

    ``weights`` (one per adapter, default 1; negative subtracts) scale each adapter's update.
    ``dtype`` ``auto`` keeps every tensor's dtype; ``fp32``/``fp16``/``bf16`` cast every float tensor.
    ``max_shard_size`` (``5GB``, ``500MB``, ``2GiB``) reshards; by default the base's shard names are kept.
    ``device="cuda"`` computes updates on the GPU. ``verify`` checks the output before publishing.
    ``include``/``exclude`` pick adapter modules by regex. ``trust_tensors`` takes the tensors' rank where the
    config disagrees. ``skip_modules`` (ONNX bases) leaves out modules the graph does not hold.
    ``requantize``, ``reference`` and ``into`` are for quantized bases (:mod:`.quantized`).
    ``allow_alora`` merges an activated LoRA although merged it acts on every token.
    ``allow_other_base`` merges an adapter that says it was trained on another model (:mod:`loratools.ops.base_match`).
    ``expand_base`` widens a base's Flux input layer (img_in/x_embedder, zero columns) to a control LoRA's wider
    input (Canny/Depth) before merging, and writes the wider tensor and config (:mod:`.widen`).
    ``progress(total_bytes)`` may return a context manager yielding ``advance(n_bytes)``.
    """

    weights: Sequence[float] | None = None
    dtype: str = "auto"
    max_shard_size: str | int | None = None
    device: str = "cpu"
    verify: bool = False
    overwrite: bool = False
    include: str | None = None
    exclude: str | None = None
    trust_tensors: bool = False
    skip_modules: Sequence[str] = ()
    requantize: bool = False
    reference: str | Path | None = None
    into: str = "base"
    allow_alora: bool = False
    allow_other_base: bool = False
    expand_base: bool = False
    progress: Progress | None = field(default=None, compare=False)

    @classmethod
    def of(cls, options: dict[str, Any]) -> MergeOptions:
        """From ``merge``'s keyword arguments; an unknown name is a ``UsageError`` naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            names = ", ".join(sorted(known))
            raise UsageError(f"merge() got an unknown option {unknown[0]!r}", hint=f"options: {names}")
        return cls(**options)

    def chosen(self) -> list[str]:
        """The options set to something other than their default (the ones a base kind may refuse)."""
        default = MergeOptions()
        out = []
        for f in fields(self):
            if f.name in ALWAYS:
                continue
            value, base = getattr(self, f.name), getattr(default, f.name)
            if f.name == "dtype" and value in (None, "auto"):
                continue
            if f.name == "skip_modules" and not value:
                continue
            if value != base and value is not None:
                out.append(f.name)
        return out


#: options every base kind takes
ALWAYS = frozenset(
    {"weights", "overwrite", "include", "exclude", "trust_tensors", "allow_alora", "allow_other_base", "progress"}
)

#: option -> its command-line spelling
FLAGS = {
    "dtype": "--dtype",
    "max_shard_size": "--max-shard-size",
    "device": "--device",
    "verify": "--verify",
    "skip_modules": "--skip-module",
    "requantize": "--requantize",
    "reference": "--reference",
    "into": "--into",
    "expand_base": "--expand-base",
}


def flag(name: str, value: Any = None) -> str:
    spelled = FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is None or isinstance(value, bool):
        return spelled
    shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return f"{spelled} {shown}"


def refuse_unaccepted(options: MergeOptions, label: str, accepts: frozenset[str], why: str) -> None:
    """One refusal for every base kind: the options set that ``accepts`` lacks, what the base takes, and why."""
    refused = [name for name in options.chosen() if name not in accepts]
    if not refused:
        return
    given = ", ".join(flag(n, getattr(options, n)) for n in refused)
    takes = sorted(FLAGS[n] for n in accepts if n in FLAGS)
    raise UsageError(
        f"{given}: merging into {label} does not take {'this option' if len(refused) == 1 else 'these options'} "
        f"({why})",
        hint=f"leave out {', '.join(flag(n) for n in refused)}"
        + (f"; {label} takes {', '.join(takes)}" if takes else ""),
    )
