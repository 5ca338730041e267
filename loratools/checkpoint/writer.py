"""Streaming safetensors writer, shard plans and index files.

A file is written in one pass: the header first (from a plan of ``(name, dtype, shape)``), then each
tensor's bytes in plan order, either from a tensor or copied byte for byte from a range of a source
file (``os.copy_file_range``/``sendfile`` keep the bytes in the kernel; nothing is decoded). Output is
a pure function of the inputs: header keys sorted, no timestamps, no paths.

``direct=True`` (the merge's writer) writes with O_DIRECT where the file system has it
(:mod:`loratools.checkpoint.direct_io`: no page-cache copy, the kernel time of a 5 GB write 11.6 -> 0.7 s).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import FormatError, UsageError
from loratools.files.safetensors_file import DTYPES

if TYPE_CHECKING:
    import torch

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_COPY_CHUNK = 1 << 30
_BUFFER = 8 << 20


def parse_size(text: str | int) -> int:
    """Hugging Face size strings: ``5GB`` (10^9), ``500MB``, ``2GiB`` (2^30), or a byte count."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if not m:
            raise UsageError(
                f"--max-shard-size {text!r} is not a size", hint="use Hugging Face units: 5GB, 500MB, 2GiB"
            )
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise UsageError(f"--max-shard-size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a planned file: its name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass
class ShardPlan:
    """Output files in order, each with its tensors in write order."""

    files: dict[str, list[TensorEntry]] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(e.nbytes for entries in self.files.values() for e in entries)

    def weight_map(self) -> dict[str, str]:
        return {e.name: fname for fname, entries in self.files.items() for e in entries}


def shard_name(prefix: str, i: int, n: int) -> str:
    """``model-00001-of-00003.safetensors`` (Hugging Face's naming)."""
    return f"{prefix}-{i:05d}-of-{n:05d}.safetensors"


def plan_shards(entries: Iterable[TensorEntry], max_shard_size: int, prefix: str = "model") -> ShardPlan:
    """Pack tensors in order into shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own).

    One shard is named ``<prefix>.safetensors``; several ``<prefix>-0000i-of-0000N.safetensors``.
    """
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    if len(groups) == 1:
        return ShardPlan({f"{prefix}.safetensors": groups[0]})
    n = len(groups)
    return ShardPlan({shard_name(prefix, i + 1, n): g for i, g in enumerate(groups)})


def header_bytes(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed, space-padded (to 8 bytes) JSON header for ``entries`` in data order."""
    header: dict[str, object] = {}
    offset = 0
    seen = set()
    for e in entries:
        if e.name in seen or e.name == "__metadata__":
            raise FormatError(f"tensor name {e.name!r} appears twice in one output file")
        seen.add(e.name)
        if e.dtype not in DTYPES:
            raise FormatError(f"tensor {e.name!r}: unknown dtype {e.dtype!r}")
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes (little-endian, C order) without copying a contiguous CPU tensor."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    import torch

    return memoryview(t.view(torch.uint8).numpy())


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src_fd`` to ``dst_fd``'s position, in the kernel when possible."""
    end = offset + count
    pos = offset
    for fn in ("copy_file_range", "sendfile"):
        call = getattr(os, fn, None)
        if call is None:
            continue
        try:
            while pos < end:
                if fn == "copy_file_range":
                    n = call(src_fd, dst_fd, min(_COPY_CHUNK, end - pos), pos)
                else:
                    n = call(dst_fd, src_fd, pos, min(_COPY_CHUNK, end - pos))
                if n <= 0:
                    break
                pos += n
            if pos >= end:
                return
        except OSError:
            continue  # EXDEV, ENOSYS, EINVAL on some file systems: try the next way
    while pos < end:
        chunk = os.pread(src_fd, min(_BUFFER, end - pos), pos)
        if not chunk:
            raise FormatError(f"unexpected end of a source file at byte {pos}")
        os.write(dst_fd, chunk)
        pos += len(chunk)


class SafetensorsWriter:
    """Writes one safetensors file: the header at open, then tensors in plan order.

    ``write(name, tensor)`` encodes a tensor; ``copy(name, src_path, start)`` copies the same number of
    bytes from a source file; ``write_part`` writes consecutive pieces of one tensor.
    ``close()`` checks that every planned tensor was written.
    """

    def __init__(
        self,
        path: str | Path,
        entries: list[TensorEntry],
        metadata: dict[str, str] | None = None,
        direct: bool = False,
    ) -> None:
        self.path = Path(path)
        self.entries = list(entries)
        self._next = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        from loratools.checkpoint.direct_io import open_direct

        opened = open_direct(self.path, flags) if direct else None
        self._fd, self._sink = opened if opened is not None else (os.open(self.path, flags, 0o644), None)
        self._sources: dict[Path, int] = {}
        self._part: list | None = None  # [entry, bytes written] of a tensor written in pieces
        self.bytes_written = 0
        header = header_bytes(self.entries, metadata)
        self._starts: dict[str, int] = {}  # tensor name -> offset of its bytes in the file
        pos = len(header)
        for e in self.entries:
            self._starts[e.name] = pos
            pos += e.nbytes
        self._put(header)

    def offset_of(self, name: str) -> int:
        """Where tensor ``name``'s bytes start in the file (a piece's memory aligned like its file offset is
        written without the staging copy, :mod:`~loratools.checkpoint.direct_io`)."""
        return self._starts[name]

    def _put(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if self._sink is not None:
            self._sink.put(view)
            self.bytes_written += len(view)
            return
        while view:
            n = os.write(self._fd, view[:_COPY_CHUNK])
            view = view[n:]
            self.bytes_written += n

    def _expect(self, name: str) -> TensorEntry:
        if self._part is not None:
            raise FormatError(f"{self.path.name}: tensor {self._part[0].name!r} is unfinished, got {name!r}")
        if self._next >= len(self.entries) or self.entries[self._next].name != name:
            want = self.entries[self._next].name if self._next < len(self.entries) else "nothing"
            raise FormatError(f"{self.path.name}: wrote {name!r} out of order (expected {want})")
        self._next += 1
        return self.entries[self._next - 1]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor from memory (its dtype and shape must match the plan)."""
        e = self._expect(name)
        data = tensor_bytes(tensor)
        if tuple(tensor.shape) != e.shape or data.nbytes != e.nbytes:
            raise FormatError(f"{self.path.name}: tensor {name!r} is {tuple(tensor.shape)}, the plan says {e.shape}")
        self._put(data)

    def write_part(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next piece of tensor ``name`` (consecutive pieces in C order make the whole tensor: a
        stack of experts written a run of experts at a time); the tensor is done when its bytes are."""
        data = tensor_bytes(tensor)
        self._piece(name, data.nbytes)
        self._put(data)

    def _piece(self, name: str, nbytes: int) -> None:
        if self._part is None or self._part[0].name != name:
            if self._part is not None:
                raise FormatError(f"{self.path.name}: tensor {self._part[0].name!r} is unfinished, got {name!r}")
            self._part = [self._expect(name), 0]
        entry, done = self._part
        if done + nbytes > entry.nbytes:
            raise FormatError(f"{self.path.name}: pieces of {name!r} exceed its {entry.nbytes} planned bytes")
        self._part[1] = done + nbytes
        if done + nbytes == entry.nbytes:
            self._part = None

    def copy(self, name: str, src: str | Path, start: int, count: int | None = None) -> None:
        """Write the next tensor (or run of tensors: ``count`` bytes) straight from ``src`` at ``start``."""
        e = self._expect(name)
        nbytes = e.nbytes if count is None else count
        self._copy_bytes(Path(src), start, nbytes)

    def copy_run(self, names: list[str], src: str | Path, start: int) -> None:
        """Copy several consecutive tensors whose bytes are contiguous in ``src`` with one call."""
        total = sum(self._expect(n).nbytes for n in names)
        self._copy_bytes(Path(src), start, total)

    def _copy_bytes(self, src: Path, start: int, nbytes: int) -> None:
        fd = self._sources.get(src)
        if fd is None:
            fd = self._sources[src] = os.open(src, os.O_RDONLY)
        if self._sink is not None:
            self._sink.copy_from(fd, start, nbytes)
        else:
            copy_range(fd, self._fd, start, nbytes)
        self.bytes_written += nbytes

    def close(self) -> None:
        if self._sink is not None and self._fd >= 0:
            self._sink.finish(self.bytes_written)
        self.abort()
        if self._next != len(self.entries) or self._part is not None:
            missing = len(self.entries) - self._next + (self._part is not None)
            raise FormatError(f"{self.path.name}: {missing} planned tensors were not written")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def abort(self) -> None:
        """Close every file without the completeness check (after an error)."""
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
            return
        self.close()


def write_index(path: str | Path, plan: ShardPlan, metadata: dict[str, object] | None = None) -> None:
    """A Hugging Face ``*.safetensors.index.json`` for ``plan`` (keys sorted, total_size in bytes)."""
    meta = dict(metadata or {})
    meta["total_size"] = plan.total_size
    doc = {"metadata": meta, "weight_map": dict(sorted(plan.weight_map().items()))}
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = [
    "SafetensorsWriter",
    "ShardPlan",
    "TensorEntry",
    "copy_range",
    "header_bytes",
    "parse_size",
    "plan_shards",
    "shard_name",
    "tensor_bytes",
    "write_index",
]
