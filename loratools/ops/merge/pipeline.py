"""The merge's writer thread and the pool of output pieces it writes from.

Disk writes overlap the arithmetic: the main thread hands write calls to one writer thread, in order. Two kinds
of buffers travel to it:

- the ring buffers of :class:`~loratools.ops.merge.write.BaseBytes` (recycled after a fixed number of reads): a
  call writing one may only be queued once the writer has taken everything before it (the ring's three buffers
  are then safe: one being written, one queued, one being filled);
- pieces lent by a :class:`PiecePool` (the row runs of large 2-D weights, nearly all of a Flux merge's bytes):
  these queue freely, up to the pool's byte budget, and go back to the pool once written. A deep queue lets the
  arithmetic run ahead while the disk stalls and the disk write on while a run is computed (issue 21's
  benchmark: 4.1-4.3 s -> 3.3-3.6 s of merge for 5.1 GB, the disk's O_DIRECT floor being ~3.4 s).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: how often a waiting thread looks at the stop flag and the writer's error; how long the error path waits at most
POLL_S = 0.2
ABORT_JOIN_S = 10.0
#: bytes of lent pieces at most (queued, being written, or being filled): 8 row runs of 16 MB
POOL_BYTES = 128 << 20


class Pipeline:
    """Runs write calls on one background thread, in order, so disk I/O overlaps the arithmetic."""

    def __init__(self) -> None:
        self.q: deque[Callable[[], object] | None] = deque()
        self.cv = threading.Condition()
        self.error: BaseException | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="loratools-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.q and not self.stopped:
                    self.cv.wait(POLL_S)  # the timeout: `stopped` is looked at even if a notify was lost
                if self.stopped:
                    return
                fn = self.q.popleft()
                self.cv.notify_all()  # a submit waiting for an empty queue
            if fn is None:
                return
            if self.error is None:
                try:
                    fn()
                except BaseException as exc:  # re-raised in the main thread
                    self.error = exc
                    with self.cv:
                        self.cv.notify_all()

    def submit(self, fn: Callable[[], object], pooled: bool = False) -> None:
        """Queue ``fn``. Unless ``pooled`` (it writes a :class:`PiecePool` piece), wait until the writer has taken
        every call queued before: a ring buffer must not wait in the queue behind another."""
        with self.cv:
            while not pooled and self.q and self.error is None and not self.stopped:
                self.cv.wait(POLL_S)
            if self.error is not None:
                raise self.error
            self.q.append(fn)
            self.cv.notify_all()

    def drain(self) -> None:
        done = threading.Event()
        self.submit(done.set)
        while not done.wait(POLL_S):
            if self.error is not None:
                raise self.error
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.submit(None)  # type: ignore[arg-type]  # the writer's stop mark
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """The error path (an exception, SIGTERM's ``Terminated``): stop the writer without waiting on it for
        ever. An exception raised by a signal handler inside a lock's or ``join``'s wait can lose their handshake
        (CPython's threading primitives are not signal-safe: a merge hung here after SIGTERM), so the writer
        polls a flag and is waited on for a bounded time; it is a daemon thread."""
        self.stopped = True
        self.thread.join(timeout=ABORT_JOIN_S)


class PiecePool:
    """Output buffers lent for a write and given back by the writer thread once written: at most
    :data:`POOL_BYTES` lent at a time (one piece whatever its size), recycled (fresh memory page-faults on
    every touch and costs more than the arithmetic)."""

    def __init__(self, pipe: Pipeline, budget: int | None = None) -> None:
        self.pipe = pipe
        self.budget = POOL_BYTES if budget is None else budget
        self.free: list[torch.Tensor] = []
        self.lent: dict[int, torch.Tensor] = {}  # the storage address of a lent piece -> its whole buffer
        self.lent_bytes = 0
        self.cv = threading.Condition()

    def lend(self, nbytes: int, phase: int | None = None) -> torch.Tensor:
        """``nbytes`` uint8, its address ``phase`` modulo the O_DIRECT alignment (see ``BaseBytes.buffer``).
        Waits while the pool's budget is lent out (the writer gives pieces back)."""
        import torch

        from loratools.checkpoint.direct_io import ALIGN

        need = nbytes + ALIGN
        with self.cv:
            while self.lent and self.lent_bytes + need > self.budget:
                if self.pipe.error is not None:
                    raise self.pipe.error
                self.cv.wait(POLL_S)
            fits = [i for i, b in enumerate(self.free) if b.numel() >= need]  # by index: tensors' == is elementwise
            if fits:
                buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
            else:
                while self.free and sum(b.numel() for b in self.free) + self.lent_bytes + need > self.budget:
                    self.free.sort(key=lambda b: b.numel())
                    del self.free[0]  # too small to keep: freed
                buf = torch.empty(need, dtype=torch.uint8)
            self.lent[buf.data_ptr()] = buf
            self.lent_bytes += buf.numel()
        skip = (phase - buf.data_ptr()) % ALIGN if phase is not None else 0
        return buf[skip : skip + nbytes]

    def owns(self, piece: torch.Tensor) -> bool:
        return piece.untyped_storage().data_ptr() in self.lent

    def give_back(self, piece: torch.Tensor) -> None:
        with self.cv:
            buf = self.lent.pop(piece.untyped_storage().data_ptr())
            self.lent_bytes -= buf.numel()
            self.free.append(buf)
            self.cv.notify_all()


@contextlib.contextmanager
def torch_threads() -> Any:
    """One fewer compute thread than cores: the writer thread gets a core of its own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)
