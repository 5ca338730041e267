"""Writing one unit of a merge: recycled read buffers, in-place updates, a writer thread.

Touched tensors are read with ``pread`` into a small ring of recycled buffers (not the page-cache map,
so they do not stay in our RSS), or by row runs from a private map of the base file into buffers lent by a
byte-bounded pool, updated and handed to one writer thread (ops/merge/pipeline.py), which also runs the kernel
copies of untouched byte ranges, so disk I/O overlaps the arithmetic.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import NumericError

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.reader import CheckpointReader
    from loratools.ops.merge.layout import Source, Unit
    from loratools.ops.merge.pipeline import PiecePool

#: Linux 5.14+ (older kernels refuse it: then the pages fault in as they are read)
_MADV_POPULATE_READ = 22
#: test hook: seconds to sleep after each written weight file (lets a test kill a merge mid-way)
PAUSE_ENV = "LORATOOLS_MERGE_TEST_PAUSE"


class BaseBytes:
    """Reads base tensors into private buffers with ``pread`` (no shared map pages in our RSS).

    With ``reuse=n`` a ring of n buffers is recycled (a returned tensor stays valid for n-1 more
    ``get`` calls): fresh allocations page-fault on every touch and cost more than the arithmetic.
    """

    def __init__(self, reader: CheckpointReader, reuse: int = 0) -> None:
        self.reader = reader
        self.fds: dict[Path, int] = {}
        self._ring: list[torch.Tensor | None] = [None] * reuse
        self._turn = 0
        self._scratch: dict[int, torch.Tensor] = {}
        self._work: torch.Tensor | None = None
        self._maps: dict[Path, mmap.mmap | None] = {}
        self._helper: Any = None  # a one-thread executor: the second half of each row run (both cores compute)
        self.out_offset: int | None = None  # where the output tensor being made starts in its file
        self.pool: PiecePool | None = None  # where a merge's row runs take their output buffers (write_unit's)

    def get(self, key: str) -> torch.Tensor:
        info = self.reader.info(key)
        if not hasattr(info, "start"):
            return self.reader.get(key)
        return self.get_rows(key, 0, info.shape[0] if info.shape else 1)

    def get_rows(self, key: str, first: int, count: int) -> torch.Tensor:
        """Rows ``first … first+count-1`` of the outer dimension of base tensor ``key`` (one contiguous byte
        range of its file; a 0-d tensor is one row), read like :meth:`get`."""
        from loratools.files.safetensors_file import torch_dtype
        from loratools.ops.merge.factors import pread_exact

        info = self.reader.info(key)
        shape = tuple(info.shape)
        row = info.nbytes // shape[0] if shape and shape[0] else info.nbytes
        nbytes = row * count if shape else info.nbytes
        path = self.reader.file_of(key)
        buf = self.buffer(nbytes)
        pread_exact(self._fd(path), buf, info.start + row * first, path, key)
        return buf.view(torch_dtype(info.dtype)).reshape((count, *shape[1:]) if shape else shape)

    def _fd(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def work(self, nbytes: int) -> torch.Tensor:
        """A recycled uint8 work buffer (not the ring's: it never goes to the writer)."""
        import torch

        if self._work is None or self._work.numel() < nbytes:
            self._work = None
            self._work = torch.empty(nbytes, dtype=torch.uint8)
        return self._work[:nbytes]

    def buffer(self, nbytes: int, phase: int | None = None) -> torch.Tensor:
        """``nbytes`` uint8: the next buffer of the ring (a fresh one without a ring). ``phase``: its address
        modulo the O_DIRECT alignment (the file position its bytes go to, modulo it: written from here, no
        staging copy)."""
        import torch

        from loratools.checkpoint.direct_io import ALIGN

        extra = ALIGN if phase is not None else 0
        if not self._ring:
            buf = torch.empty(nbytes + extra, dtype=torch.uint8)
        else:
            i = self._turn = (self._turn + 1) % len(self._ring)
            if self._ring[i] is None or self._ring[i].numel() < nbytes + extra:
                self._ring[i] = None  # freed before the larger one is allocated
                self._ring[i] = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
            buf = self._ring[i]
        skip = (phase - buf.data_ptr()) % ALIGN if phase is not None else 0
        return buf[skip : skip + nbytes]

    def mapped_rows(
        self, key: str, first: int, count: int, raw: bool = False
    ) -> tuple[torch.Tensor, Callable[[], None]] | None:
        """Rows like :meth:`get_rows`, as a read-only view of the file's pages (a private map: no copy into
        our memory), and the call that drops those pages from our address space again (the page cache keeps
        them; RSS stays at one run); None where the file cannot be mapped (then :meth:`get_rows`). ``raw``: the
        tensor as stored in a quantized base (its fp8 codes), not the dequantized weight."""
        import torch

        from loratools.files.safetensors_file import torch_dtype

        info = self.reader.quant.raw_info(key) if raw else self.reader.info(key)
        shape = tuple(info.shape)
        path = self.reader.raw_weight_map[key] if raw else self.reader.file_of(key)
        if not shape or not shape[0] or not hasattr(info, "start"):
            return None
        if path not in self._maps:
            try:
                self._maps[path] = mmap.mmap(self._fd(path), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):  # an empty or unmappable file
                self._maps[path] = None
        mm = self._maps[path]
        row = info.nbytes // shape[0]
        start, nbytes = info.start + row * first, row * count
        if mm is None or start + nbytes > len(mm):
            return None
        view = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=start)
        page = mmap.PAGESIZE
        lo = start // page * page
        with contextlib.suppress(OSError, ValueError):  # the run's page tables in one call, not a fault per 64 KB
            mm.madvise(_MADV_POPULATE_READ, lo, min(len(mm), start + nbytes) - lo)

        def drop() -> None:
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_DONTNEED, lo, min(len(mm), start + nbytes) - lo)

        return view.view(torch_dtype(info.dtype)).reshape(count, *shape[1:]), drop

    def scratch(self, numel: int, slot: int = 0) -> torch.Tensor:
        """A recycled fp32 work buffer of ``numel`` elements (one per ``slot``: per compute thread)."""
        import torch

        have = self._scratch.get(slot)
        if have is None or have.numel() < numel:
            have = self._scratch[slot] = torch.empty(numel, dtype=torch.float32)
        return have[:numel]

    def helper(self) -> Any:
        """A one-thread executor for a second compute thread, or None on a one-core machine. torch's own
        threads do not help here: a row block's ops are too small to split (two OpenMP threads per op ran
        slower than one), while two threads on two halves of a run share nothing."""
        if self._helper is None and (os.cpu_count() or 1) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._helper = ThreadPoolExecutor(1, thread_name_prefix="loratools-compute")
        return self._helper

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown()
            self._helper = None
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):  # a view still alive: the map goes with it
                if mm is not None:
                    mm.close()
        self._maps.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def write_unit(reader, unit: Unit, tmp: Path, single: bool, dev, advance, factors=None) -> int:  # noqa: ANN001
    """Write ``unit`` under ``tmp``; ``factors`` (a FactorStore) reads each job's adapter factors just in time."""
    from functools import partial

    from loratools.checkpoint.writer import SafetensorsWriter, write_index
    from loratools.ops.merge.pipeline import PiecePool, Pipeline
    from loratools.ops.merge.quant_stream import quant_pieces
    from loratools.ops.merge.stacked import pieces

    sub = reader.components[unit.subdir.split("/")[0]] if reader.kind == "pipeline" else reader
    prefix = f"{unit.subdir.split('/')[0]}." if reader.kind == "pipeline" else ""
    base = BaseBytes(sub, reuse=3)
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    writers: list[SafetensorsWriter] = []
    pipe = Pipeline()
    base.pool = pool = PiecePool(pipe)
    try:
        for f in unit.files:
            path = tmp if single else tmp / f.rel
            path.parent.mkdir(parents=True, exist_ok=True)
            w = SafetensorsWriter(path, f.entries, f.metadata, direct=True)
            writers.append(w)
            run: list[str] = []
            run_src: Source | None = None
            run_end = 0
            for e in f.entries:
                src = f.sources[e.name]
                if src.kind == "copy" and run and src.path == run_src.path and src.start == run_end:
                    run.append(e.name)
                    run_end += src.nbytes
                    continue
                if run:
                    pipe.submit(partial(w.copy_run, run, run_src.path, run_src.start))
                    advance(run_end - run_src.start)
                    run = []
                if src.kind == "copy":
                    run, run_src, run_end = [e.name], src, src.start + src.nbytes
                    continue
                try:
                    base.out_offset = w.offset_of(e.name)
                    parts = pieces(src, e.dtype, base, prefix, dev, factors)  # a stack of experts, run by run
                    parts = parts or quant_pieces(src, e.dtype, base, prefix, dev, factors)  # MXFP4 experts too
                    if parts is None:
                        tensor = _cast_checked(e.name, _make(src, e.dtype, base, prefix, dev, factors))
                        pipe.submit(partial(w.write, e.name, tensor))
                        advance(e.nbytes)
                    for row, piece, *checked in parts or ():  # a third item True: checked finite in cache
                        piece = piece if checked and checked[0] else _cast_checked(e.name, piece, row)
                        lent = pool.owns(piece)
                        pipe.submit(partial(_write_piece, w, e.name, piece, pool if lent else None), pooled=lent)
                        advance(piece.numel() * piece.element_size())
                except NumericError as exc:  # the merge's NaN/overflow messages name the tensor: add the base
                    if str(sub.root) in exc.message:
                        raise
                    raise NumericError(f"{sub.root}: {exc.message}", hint=exc.hint, path=sub.root) from None
            if run:
                pipe.submit(partial(w.copy_run, run, run_src.path, run_src.start))
                advance(run_end - run_src.start)
            pipe.submit(w.close)
            if pause:
                pipe.drain()
                time.sleep(pause)
        pipe.close()
    finally:
        if pipe.thread.is_alive():
            pipe.abort()
        for w in writers:
            w.abort()
        base.close()
    written = sum(w.bytes_written for w in writers)
    if unit.index_name:
        index_path = tmp / unit.subdir / unit.index_name if unit.subdir else tmp / unit.index_name
        write_index(index_path, unit.shard_plan, unit.index_meta)
        written += index_path.stat().st_size
    return written


def _write_piece(w, name: str, piece: torch.Tensor, pool: PiecePool | None) -> None:  # noqa: ANN001
    """The writer thread's part for one piece of a tensor: written, then given back to the pool it was lent from."""
    w.write_part(name, piece)
    if pool is not None:
        pool.give_back(piece)


def _cast_checked(name: str, t: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """A merged output tensor must be finite (one cheap fp32 sum): a cast to fp16 overflows above 65504, and
    the in-place update of bf16/fp32 blocks (near their range: a dequantized base) can overflow as well.
    ``first_row``: where ``t`` starts in the outer dimension of the tensor it is a piece of (for the index)."""
    import torch

    # fp16 sums in fp32 (its own range ends at 65504); bf16/fp32 sum in their own dtype, ~3x faster than a bf16
    # sum into fp32 (profiled: 1/4 of a fused-expert merge). NaN/Inf anywhere makes any sum non-finite; a finite
    # fp32 sum beyond bf16's range only means the closer look below
    total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum() if t.is_floating_point() else None
    if total is not None and not bool(torch.isfinite(total)):
        from loratools.model.finite import first_nonfinite

        first = first_nonfinite(t)
        if first:
            first[0] += first_row
        if first is not None and t.dtype == torch.float16:
            raise NumericError(
                f"tensor {name}: the merged values overflow fp16 (|value| > 65504, first at index {first})",
                hint="merge with --dtype bf16 or fp32, or lower the adapter's weight; nothing was written",
            )
        if first is not None:
            raise NumericError(
                f"merging into {name} produced NaN or Inf values (first at index {first})",
                hint="the base or the adapter holds extreme values; nothing was written",
            )
    return t


def _make(src: Source, dtype: str, base: BaseBytes, prefix: str, dev, factors) -> torch.Tensor:  # noqa: ANN001
    from loratools.files.safetensors_file import torch_dtype
    from loratools.ops.merge.plan import BLOCK_ELEMENTS, apply_inplace, compute

    target = torch_dtype(dtype)
    if src.job is None:  # a cast
        return base.get(src.key[len(prefix) :]).to(target)
    job = factors.resolve(src.job) if factors is not None else src.job
    if job.replacement is not None:
        return compute(job, None, dev).to(target)
    source = base.get(job.source[len(prefix) :])
    generic = any(not hasattr(c.lora, "factors") for c in (*job.deltas, *job.biases))  # other families
    inplace = dev is None and job.dora is None and not generic and job.scale == 1  # a scaled head: compute()
    if inplace and source.dtype == target and source.is_floating_point():
        return apply_inplace(job, source, base.scratch(BLOCK_ELEMENTS + source[0].numel()))
    return compute(job, source, dev).to(target)
