"""A GGUF MoE base's stacked expert tensor (``blk.L.ffn_{gate,up,down}_exps``, PyTorch shape ``(E, out, in)``)
merged one expert slice at a time: memory O(one expert), not O(E·out·in).

Quant blocks run along ``in`` (GGUF ``ne[0]``), so slice ``e`` is the ``e``-th of E equal, contiguous byte
ranges of the tensor's data. A touched expert is read, decoded, updated with its own ΔW in fp32 and encoded
in the tensor's output type by the same code as a whole 2-D tensor (:func:`loratools.ops.merge.gguf._merged`,
passed in as ``merged``); a run of untouched experts is copied file to file in the kernel when the type stays,
and decoded and re-encoded when the tensor is retyped (a K-quant written as F16). The pieces go to the data
section back to back, padded once at the tensor's end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ExpertSlice:
    """What the per-tensor codec reads of a tensor (``GgufTensor``'s fields), for one expert's slice."""

    name: str
    shape: tuple[int, ...]
    type_label: str
    tensor_type: Any
    n_elements: int
    n_bytes: int
    data_offset: int


def expert_slice(t: Any, e: int) -> ExpertSlice:
    """Slice ``e`` of the stacked tensor ``t`` (its name says which expert, for error messages)."""
    n = int(t.shape[0])
    size = int(t.n_bytes) // n
    return ExpertSlice(
        f"{t.name}[{e}]", tuple(int(d) for d in t.shape[1:]), t.type_label, t.tensor_type, int(t.n_elements) // n,
        size, int(t.data_offset) + e * size,
    )  # fmt: skip


def _untouched_run(t: Any, by_expert: dict[int, Any], e: int) -> int:
    """The first expert at or after ``e`` that an update touches (or E)."""
    n = int(t.shape[0])
    while e < n and e not in by_expert:
        e += 1
    return e


def write_experts(
    t: Any, by_expert: dict[int, list[Any]], out_type: str, src: int, base: Path, data: Any, scratch: Any,
    merged: Any,
) -> int:  # fmt: skip
    """Stacked tensor ``t`` plus each expert's pairs (``by_expert``: expert -> [(lora_a, lora_b)]) into the data
    section ``data``, expert by expert; bytes of tensor data written."""
    n, e, written = int(t.shape[0]), 0, 0
    while e < n:
        if e not in by_expert and out_type == t.type_label:
            end = _untouched_run(t, by_expert, e)
            first = expert_slice(t, e)
            size = first.n_bytes * (end - e)
            data.copy(src, first.data_offset, size, pad=False)
            written, e = written + size, end
            continue
        scratch.next_slot()  # the other byte buffer, once the writer is done with it
        encoded = merged(expert_slice(t, e), by_expert.get(e, []), src, base, t.name, scratch)[0]
        scratch.lend(data.write(encoded, pad=False))
        written, e = written + int(encoded.nbytes), e + 1
    data.pad()
    return written


def verify_experts(
    old: Any, new: Any, by_expert: dict[int, list[Any]], out_type: str, fds: tuple[int, int], base: Path,
    scratch: Any, merged: Any,
) -> bool:  # fmt: skip
    """Whether the merged file's tensor ``new`` holds the base's ``old`` plus each expert's ΔW as encoded,
    untouched experts byte-identical (re-encoded alike when retyped), read back one expert at a time."""
    from loratools.ops.merge.gguf_tensors import same_bytes

    a, b = fds
    n = int(old.shape[0])
    if new.type_label != out_type or tuple(new.shape) != tuple(old.shape) or int(new.n_bytes) % n:
        return False
    size = int(new.n_bytes) // n
    for e in range(n):
        where = int(new.data_offset) + e * size
        part = expert_slice(old, e)
        if e not in by_expert and out_type == old.type_label:
            if part.n_bytes != size or not same_bytes(b, where, (a, part.data_offset, part.n_bytes)):
                return False
            continue
        want = merged(part, by_expert.get(e, []), a, base, old.name, scratch)[0]
        if want.nbytes != size or not same_bytes(b, where, want):
            return False
    return True
