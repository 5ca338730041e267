"""A checked, lazy safetensors reader shared by adapter formats and base checkpoints.

The header is validated before anything is allocated: its length is bounded, it is a JSON object,
every dtype is known, shape × dtype size equals the byte range, ranges lie inside the file, do not
overlap and are aligned to the element size. Tensors are then read one at a time from a memory map.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import FormatError, InputNotFoundError, UnsafeInputError

if TYPE_CHECKING:
    import torch

#: safetensors' own limit for the JSON header
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 8

#: safetensors dtype name -> (torch dtype attribute name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[name][0])


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``BF16``)."""
    short = str(dtype).removeprefix("torch.")
    for name, (attr, _) in DTYPES.items():
        if attr == short:
            return name
    raise FormatError(f"dtype {dtype} cannot be stored in safetensors")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; ``start``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def _bad(path: Path, what: str) -> FormatError:
    return FormatError(
        f"{path}: not a valid safetensors file: {what}",
        hint="the file is damaged or not safetensors; download or re-save it",
        path=path,
    )


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return out


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ``(tensors, metadata)``. Allocates at most the header."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(9)
            if len(head) < 8:
                raise _bad(p, f"{size} bytes is too short for a header")
            n = int.from_bytes(head[:8], "little")
            if (n > MAX_HEADER_BYTES or n > size - 8) and head[8:9] != b"{":
                # no JSON header where one must start: some other file under a .safetensors name
                raise FormatError(
                    f"{p}: not a safetensors file (it starts with {head[:8]!r}, not an 8-byte header length "
                    "and a JSON header)",
                    hint="check the path; a text file, HTML page or Git LFS pointer is not the weights",
                    path=p,
                )
            f.seek(8)
            if n > MAX_HEADER_BYTES:
                raise UnsafeInputError(
                    f"{p}: safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES})",
                    hint="the file is damaged or hostile; do not use it",
                    path=p,
                )
            if n > size - 8:
                raise _bad(p, f"header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise InputNotFoundError(f"{p}: no such file", path=p) from None
    except IsADirectoryError:
        raise FormatError(f"{p}: is a folder, expected a .safetensors file", path=p) from None
    _check_entry_count(p, raw, size - 8 - n)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text)
        if isinstance(header, dict) and raw.count(b'"data_offsets"') > len(header) - ("__metadata__" in header):
            json.loads(text, object_pairs_hook=_unique_keys)  # fewer entries than listed: a key given twice?
    except _DuplicateKey as dup:  # json keeps the last of two entries: which one a reader takes is a guess
        raise _bad(p, f"the header lists {dup.key!r} twice") from None
    except RecursionError:
        raise UnsafeInputError(f"{p}: safetensors header is nested too deeply to parse", path=p) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(p, f"header is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _bad(p, "header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(p, "__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(p, name, entry, data_start, data_len)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, e1, a), (s2, _, b) in zip(spans, spans[1:], strict=False):
        if s2 < e1:
            raise _bad(p, f"tensors {a!r} and {b!r} overlap")
    return tensors, dict(metadata)


#: tensors one file may list: ~100k for a LoRA on every expert of a DeepSeek-V3; parsing costs ~1 KB each
MAX_TENSORS = 300_000
#: empty tensors (no data bytes) one file may list: they are the only entries the data size does not bound
MAX_EMPTY_TENSORS = 4096
_EMPTY_SPAN = re.compile(rb'"data_offsets"\s*:\s*\[\s*(\d+)\s*,\s*\1\s*\]')


def _check_entry_count(p: Path, raw: bytes, data_len: int) -> None:
    """Refuse, before parsing, a header listing more tensors than the file can hold (each non-empty tensor
    needs a data byte; empty ones are capped): parsing a million entries costs a gigabyte and half a minute."""
    entries = raw.count(b'"data_offsets"')
    if entries <= MAX_EMPTY_TENSORS:  # cheap to parse: each entry's own checks name what is wrong
        return
    empty = len(_EMPTY_SPAN.findall(raw))
    if entries > MAX_TENSORS or empty > MAX_EMPTY_TENSORS or entries - empty > data_len:
        why = (
            f"{empty} of them empty (limit {MAX_EMPTY_TENSORS})"
            if empty > MAX_EMPTY_TENSORS
            else (f"limit {MAX_TENSORS}" if entries > MAX_TENSORS else f"but only {data_len} data bytes")
        )
        raise UnsafeInputError(
            f"{p}: safetensors header lists {entries} tensors ({why})",
            hint="the file is damaged or hostile; do not use it",
            path=p,
        )


def _check_entry(p: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(p, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise _bad(p, f"tensor {name!r} has unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape)
    ):
        raise _bad(p, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _bad(p, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    itemsize = DTYPES[dtype][1]
    if not 0 <= begin <= end <= data_len:
        raise _bad(p, f"tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_len})")
    if math.prod(shape) * itemsize != end - begin:
        raise _bad(
            p, f"tensor {name!r}: shape {shape} of {dtype} needs {math.prod(shape) * itemsize} bytes, has {end - begin}"
        )
    if begin % itemsize:
        raise _bad(p, f"tensor {name!r} is not aligned to its {itemsize}-byte elements")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


class SafetensorsFile:
    """A validated safetensors file whose tensors are read lazily, one at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._mmap: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named {name!r}", path=self.path) from None

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, straight from the memory map (no copy)."""
        t = self.info(name)
        return memoryview(self._map())[t.start : t.end]

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a fresh (owned) torch tensor."""
        import torch

        t = self.info(name)
        if t.numel == 0:
            return torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        flat = torch.frombuffer(bytearray(self.raw(name)), dtype=torch_dtype(t.dtype))
        return flat.reshape(t.shape)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive; the map closes with it
                pass
            self._mmap = None


class LazySources:
    """Where each placeholder handed out by :func:`load_file` inside :func:`lazy_tensors` comes from."""

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self._entries: dict[int, tuple[torch.Tensor, Path, TensorInfo]] = {}

    def placeholder(self, path: Path, info: TensorInfo) -> torch.Tensor:
        import torch

        t = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")
        self._entries[id(t)] = (t, path, info)
        return t

    def source(self, tensor: torch.Tensor) -> tuple[Path, TensorInfo] | None:
        """``(file, header entry)`` of a placeholder handed out here (the very object), else None."""
        entry = self._entries.get(id(tensor))
        return (entry[1], entry[2]) if entry is not None and entry[0] is tensor else None


_LAZY: contextvars.ContextVar[LazySources | None] = contextvars.ContextVar("loratools_lazy_tensors", default=None)


@contextlib.contextmanager
def lazy_tensors(min_bytes: int = 4096) -> Iterator[LazySources]:
    """Inside, :func:`load_file` returns data-less ``meta`` placeholders for float tensors of ``min_bytes`` or
    more and records their source in the yielded :class:`LazySources` (read them later one at a time).

    A reader that computes on a placeholder gets an error or an unrecorded tensor: callers must check
    every placeholder in what they built against :meth:`LazySources.source` and otherwise load eagerly.
    """
    sources = LazySources(min_bytes)
    token = _LAZY.set(sources)
    try:
        yield sources
    finally:
        _LAZY.reset(token)


def load_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a (small) safetensors file, validated, plus its metadata (see :func:`lazy_tensors`)."""
    f = SafetensorsFile(path)
    lazy = _LAZY.get()
    try:
        out = {}
        for k, info in f.tensors.items():
            if lazy is not None and info.is_float and info.nbytes >= lazy.min_bytes:
                out[k] = lazy.placeholder(f.path, info)
            else:
                out[k] = f.get(k)
        return out, f.metadata
    finally:
        f.close()


def file_size(path: str | Path) -> int:
    return os.stat(path).st_size


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, leaving the file as readable as the umask allows (like config.json beside it).

    safetensors 0.8 writes through a temporary file created 0600 and renames it into place
    (safetensors/safetensors#782): without the chmod, an adapter is unreadable to a server running as
    another user.
    """
    from safetensors.torch import save_file as _save_file

    seen: set[tuple[int, int]] = set()  # tensors sharing memory (fused parts' one A) are written as copies
    shared = {}
    for k, t in tensors.items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (0, id(t))
        shared[k] = t.clone() if where in seen else t
        seen.add(where)
    _save_file(shared, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


_UMASK: list[int] = []


def _umask() -> int:
    if not _UMASK:  # os.umask can only be read by setting it; done once
        mask = os.umask(0o022)
        os.umask(mask)
        _UMASK.append(mask)
    return _UMASK[0]
