"""Adapter factors for a merge, held as file handles and read one module at a time.

``load_lean`` reads an adapter with :func:`~loratools.files.safetensors_file.lazy_tensors`: the format
reader builds its modules from data-less placeholders, each recorded with its file and byte range.
Every placeholder is then read once, checked (float dtype, no NaN/Inf, exactly what ``load_adapter``
checks) and dropped, so validation still covers the whole adapter before anything is written, while
the merge's adapter memory stays at one tensor. ``FactorStore.resolve`` reads a job's factors back
just before its base tensor is updated. Readers that compute on their tensors (or formats that are
not safetensors) fall back to ``load_adapter``'s eager load: same result, the adapter held whole.

A reader may hand out *views* of a placeholder: PEFT ``target_parameters`` expert slices are rows of one
``lora_A`` ``(E·r, in)`` and strided columns of one ``lora_B`` ``(out, E·r)``. A view is read as its root
tensor (once per job, or from a small cache while checking) seen through the view's own shape, strides and
offset, so an expert adapter stays in its file too: a job holds one module's factors, not the adapter.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import NumericError

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.reader import CheckpointReader
    from loratools.files.safetensors_file import LazySources, TensorInfo
    from loratools.model.adapter import Adapter, LoraModule
    from loratools.ops.merge.plan import TensorJob

#: adapter tensors this small are loaded eagerly (scalars: alphas); larger float tensors stay in their file
LAZY_MIN_BYTES = 4096
_ROLES = (("lora_A", "down"), ("lora_B", "up"), ("magnitude", "magnitude"), ("bias", "bias"))


def pread_exact(fd: int, buf: torch.Tensor, start: int, path: Path, what: str) -> None:
    """Fill the uint8 tensor ``buf`` from ``fd`` at offset ``start`` (``pread``: no page-cache map in our RSS)."""
    view, pos, n = memoryview(buf.numpy()), 0, buf.numel()
    while pos < n:
        got = os.preadv(fd, [view[pos:]], start + pos)
        if got <= 0:
            raise OSError(f"{path}: unexpected end of file reading {what}")
        pos += got


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, and it would count in peak RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class FactorStore:
    """Placeholders of lean-loaded adapters -> their bytes in the adapter files, read on demand."""

    #: roots kept between reads outside a job (checking an expert adapter reads each slice of one A and one B)
    CACHED_ROOTS = 2

    def __init__(self) -> None:
        self._sources: list[LazySources] = []
        self._fds: dict[Path, int] = {}
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(root) -> (root, its data)
        self._cache_size = self.CACHED_ROOTS

    @property
    def lazy(self) -> bool:
        return bool(self._sources)

    def add(self, sources: LazySources) -> None:
        self._sources.append(sources)

    def source(self, t: torch.Tensor) -> tuple[Path, TensorInfo] | None:
        found = self._root(t)
        return None if found is None else found[1:]

    def _root(self, t: torch.Tensor) -> tuple[torch.Tensor, Path, TensorInfo] | None:
        """``(placeholder, file, header entry)`` of a placeholder or of a view of one, else None."""
        base = t._base if t._base is not None and t._base.dtype == t.dtype else None
        for root in (t, base) if base is not None else (t,):
            for s in self._sources:
                found = s.source(root)
                if found is not None:
                    return (root, *found)
        return None

    def read(self, t: torch.Tensor) -> torch.Tensor:
        """The data of placeholder ``t`` or of a view of one (a real tensor is returned as it is)."""
        if not t.is_meta:
            return t
        found = self._root(t)
        if found is None:
            raise RuntimeError("an adapter tensor without data and without a recorded source (a loratools bug)")
        root, path, info = found
        cached = self._cache.pop(id(root), None)
        data = cached[1] if cached is not None and cached[0] is root else self._pread(path, info)
        if self._cache_size:
            self._cache[id(root)] = (root, data)  # most recent last
            while len(self._cache) > self._cache_size:
                self._cache.pop(next(iter(self._cache)))
        return data if root is t else data.as_strided(t.shape, t.stride(), t.storage_offset())

    def _pread(self, path: Path, info: TensorInfo) -> torch.Tensor:
        import torch

        from loratools.files.safetensors_file import torch_dtype

        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        pread_exact(fd, buf, info.start, path, info.name)
        return buf.view(torch_dtype(info.dtype)).reshape(info.shape)

    def forget(self) -> None:
        """Drop the cached roots (after a check pass; each job reads its own)."""
        self._cache.clear()

    def real(self, lora: LoraModule) -> LoraModule:
        """``lora`` with its factors, magnitude and bias read from disk."""
        if not hasattr(lora, "down"):  # another family: every tensor field of the dataclass
            fields = {f.name: getattr(lora, f.name) for f in dataclasses.fields(lora)}
            lazy = {k: self.read(t) for k, t in fields.items() if hasattr(t, "is_meta") and t.is_meta}
            return dataclasses.replace(lora, **lazy) if lazy else lora
        tensors = {attr: getattr(lora, attr) for _, attr in _ROLES}
        if not any(t is not None and t.is_meta for t in tensors.values()):
            return lora
        return dataclasses.replace(lora, **{k: None if t is None else self.read(t) for k, t in tensors.items()})

    def resolve(self, job: TensorJob) -> TensorJob:
        """A copy of ``job`` whose contributions hold real tensors (only this job's modules are read)."""
        if not self._sources:
            return job
        cache: dict[int, LoraModule] = {}

        def fix(c):  # noqa: ANN001, ANN202
            if id(c.lora) not in cache:
                cache[id(c.lora)] = self.real(c.lora)
            return dataclasses.replace(c, lora=cache[id(c.lora)])

        self._cache.clear()
        self._cache_size = 1 << 30  # every root this job's slices view is read once, then shared by the slices
        try:
            return dataclasses.replace(job, deltas=[fix(c) for c in job.deltas], biases=[fix(c) for c in job.biases])
        finally:
            self._cache.clear()
            self._cache_size = self.CACHED_ROOTS

    def materialized(self, adapter: Adapter) -> Adapter:
        """``adapter`` with every module read whole (for ``--verify``, which needs them all)."""
        return dataclasses.replace(adapter, modules={k: self.real(m) for k, m in adapter.modules.items()})

    def close(self) -> None:
        self._cache.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def load_lean(spec: str | Path, reader: CheckpointReader, store: FactorStore) -> Adapter:
    """Like ``load_adapter(spec, base=reader)``, with module tensors left in the file (see the module docstring)."""
    from loratools.checkpoint.keymap import normalize_adapter
    from loratools.files.safetensors_file import lazy_tensors
    from loratools.formats.adapter_io import load_adapter, weights_label
    from loratools.formats.registry import detect_format
    from loratools.publishing.hub import resolve_path

    local = resolve_path(spec, "adapter")
    try:
        with lazy_tensors(LAZY_MIN_BYTES) as sources:
            adapter = detect_format(local).read(local, base=reader)
    except Exception:  # a reader that needs the data (or a bad input): the eager path decides
        return load_adapter(spec, base=reader)
    from loratools.model.adapter import module_tensors

    pending = [t for m in adapter.modules.values() for t in module_tensors(m).values()]
    pending += list(adapter.replacements.values())
    probe = FactorStore()
    probe.add(sources)
    if any(t.is_meta and probe.source(t) is None for t in pending):
        return load_adapter(spec, base=reader)
    store.add(sources)
    adapter.meta.setdefault("source", str(spec))
    try:
        _check(adapter, weights_label(adapter, local), store)
    except NumericError:
        from loratools.model.experts import has_experts

        if has_experts(adapter):  # the expert reader's own message names the expert: let the eager read say it
            load_adapter(spec, base=reader)
        raise
    adapter.replacements = {k: store.read(t) for k, t in adapter.replacements.items()}
    for rows in (adapter.meta.get("trainable_tokens") or {}).values():
        rows["values"] = store.read(rows["values"])
    return normalize_adapter(adapter, reader)


def _check(adapter: Adapter, where: str, store: FactorStore) -> None:
    """``io.check_tensors``, one tensor in memory at a time: same order, same messages."""
    from loratools.model.finite import check_tensors

    try:
        check_tensors(adapter, where, read=store.read)
    finally:
        store.forget()
    release_memory()


def load_for_merge(
    reader: CheckpointReader,
    adapters: Sequence[str | Path | Adapter],
    store: FactorStore,
    *,
    include: str | None = None,
    exclude: str | None = None,
    trust_tensors: bool = False,
    allow_other_base: bool = False,
) -> list[Adapter]:
    """The adapters of one merge as every merge path reads them: lean (factors left in their files),
    refused when their scale is ambiguous (unless ``trust_tensors``) or when they say they were trained
    on another model than ``reader``'s (unless ``allow_other_base``; the rule of :mod:`loratools.ops.base_match`),
    then selected by ``include``/``exclude``; a UsageError when nothing is left to merge."""
    from loratools.errors import UsageError
    from loratools.model.ambiguity import require_unambiguous

    loaded = [a if not isinstance(a, str | Path) else load_lean(a, reader, store) for a in adapters]
    for a in loaded:
        require_unambiguous(a, trust_tensors=trust_tensors)
    if not allow_other_base:
        from loratools.ops.base_match import require_base

        labels = [str(a) if isinstance(a, str | Path) else str(a.meta.get("source") or "the adapter") for a in adapters]
        require_base(loaded, labels, reader)
    if include or exclude:
        loaded = [a.select(include, exclude) for a in loaded]
    if not any(a.modules or a.replacements for a in loaded):
        raise UsageError("no adapter module is left to merge", hint="check --include / --exclude")
    return loaded
