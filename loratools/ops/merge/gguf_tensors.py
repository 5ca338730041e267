"""The GGUF merge's per-tensor work, fast and bit-exact to the ``gguf`` package.

Profiled on a 1.08 GB F16 base (issue 22 §5), the old path spent its time in fresh allocations and
numpy's single-threaded conversions: ``torch.isfinite(w).all()`` twice per tensor (13.3 s for 56
tensors), numpy ``astype`` float16 <-> float32 (7.4 s), each a new ~46 MB array whose pages faulted in.
Here a touched tensor is read into one reused byte buffer, decoded into one reused fp32 buffer (torch
kernels, both cores), updated in place, checked finite by one sum (a finite sum means no NaN/Inf; only a
non-finite one pays for the exact check), encoded back into the byte buffer and written from it.

Exactness: F16/BF16 are torch's round-to-nearest-even conversions, which equal numpy's ``astype`` and the
package's BF16 rounding on every finite value; Q8_0 repeats ``gguf.quants.Q8_0`` operation by operation in
fp32 (``d = max|x|/127``, ``id = 1/d``, round half away from zero of ``x·id``, ``d`` as F16), and falls
back to the package for a chunk where ``1/d`` overflows; the K-quants (Q2_K..Q6_K), which the package cannot
encode, are :mod:`.kquant_encode` (llama.cpp's reference quantizers, byte for byte); every other type goes
through the package itself. :func:`can_encode` says which types a merge can write back in their own type.
``tests/gguf/test_gguf_codec.py`` compares the bytes with the package's.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

#: Q8_0: 32 values per block, stored as an F16 scale and 32 int8
_Q8_BLOCK, _Q8_BYTES = 32, 34
#: Q8_0 blocks per chunk: in cache, and with several torch threads under torch's parallel grain (32768
#: values): a fork/join per small op cost 5.9 s instead of 0.07 s per 11.5 M values with both cores busy
#: elsewhere; with one thread (the merge's own loop) larger, fewer calls
_CHUNK_BLOCKS, _CHUNK_BLOCKS_ONE_THREAD = 1000, 8192


def _chunk_blocks() -> int:
    import torch

    return _CHUNK_BLOCKS if torch.get_num_threads() > 1 else _CHUNK_BLOCKS_ONE_THREAD


#: types :func:`encode` writes: the package's encoders, ours for Q8_0 and the K-quants (:mod:`.kquant_encode`)
ENCODABLE = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip


def can_encode(type_name: str) -> bool:
    """Whether a merged tensor can be written back as ``type_name`` (else it becomes F16, and is listed as
    retyped). The one list both GGUF merges (LLM, experts included, and diffusion) decide by."""
    return type_name in ENCODABLE


#: values per block of the F16/BF16 encoder's finiteness check and conversion (1 MiB of fp32)
_BLOCK_VALUES = 1 << 18
#: the float just below ½ (0.5 − 2⁻²⁵)
_HALF_DOWN = 0.4999999701976776


class Scratch:
    """Buffers reused from tensor to tensor (fresh ones cost a page fault per 4 KiB every time): ``stored``
    for a tensor's bytes, read or encoded, and ``work`` for its fp32 values. With ``slots=2`` there are two
    byte buffers: one being written out by :class:`DataSection`'s writer while the next tensor is merged
    in the other (:meth:`next_slot` waits until the one it switches to is free again)."""

    def __init__(self, slots: int = 1) -> None:
        import torch

        self._stored = [torch.empty(0, dtype=torch.uint8) for _ in range(slots)]
        self._busy: list[Any] = [None] * slots
        self._slot = 0
        self._work = torch.empty(0, dtype=torch.float32)

    def next_slot(self) -> None:
        self._slot = (self._slot + 1) % len(self._stored)
        if self._busy[self._slot] is not None:
            self._busy[self._slot].result()
            self._busy[self._slot] = None

    def lend(self, done: Any) -> None:
        """The current byte buffer is in use until the future ``done`` completes."""
        self._busy[self._slot] = done

    def stored(self, n_bytes: int) -> torch.Tensor:
        if self._stored[self._slot].numel() < n_bytes:
            import torch

            self._stored[self._slot] = torch.empty(n_bytes, dtype=torch.uint8)
        return self._stored[self._slot][:n_bytes]

    def work(self, n: int) -> torch.Tensor:
        if self._work.numel() < n:
            import torch

            self._work = torch.empty(n, dtype=torch.float32)
        return self._work[:n]


def read_stored(t: Any, fd: int, scratch: Scratch) -> torch.Tensor:
    """Tensor ``t``'s stored bytes (``GgufTensor``), read with ``preadv`` into the scratch byte buffer (not
    the reader's map, whose touched pages would stay in the process and add up to the whole model)."""
    buf = scratch.stored(int(t.n_bytes))
    read_exact(fd, t.data_offset, buf.numpy())
    return buf


def decode(stored: torch.Tensor, t: Any, scratch: Scratch) -> torch.Tensor:
    """fp32 values of ``t`` (PyTorch shape) from its stored bytes, in the scratch work buffer (F32: the
    byte buffer itself). NotImplementedError for a type the ``gguf`` package cannot dequantize."""
    import torch

    kind, n = t.type_label, int(t.n_elements)
    if kind == "F32":
        return stored.view(torch.float32).view(t.shape)
    work = scratch.work(n)
    if kind in ("F16", "BF16"):
        work.copy_(stored.view(torch.float16 if kind == "F16" else torch.bfloat16))
    elif kind == "Q8_0":
        blocks = stored.view(-1, _Q8_BYTES)
        values = work.view(-1, _Q8_BLOCK)
        chunk = _chunk_blocks()
        for s in range(0, blocks.shape[0], chunk):  # x·d in fp32, as Q8_0.dequantize_blocks
            b, v = blocks[s : s + chunk], values[s : s + chunk]
            v.copy_(b[:, 2:].view(torch.int8))
            v.mul_(b[:, :2].view(torch.float16).float())
    else:
        import gguf
        import numpy as np

        byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, t.tensor_type)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf scales: refused by the caller, by name
            values = gguf.quants.dequantize(stored.numpy().reshape(byte_shape), t.tensor_type)
        work.copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1))
    return work.view(t.shape)


class NotFinite(ValueError):
    """The merged values hold NaN or Inf (raised by :func:`encode` before it writes the block holding them)."""


def all_finite(w: torch.Tensor) -> bool:
    """No NaN/Inf in ``w``: a finite sum proves it (NaN and Inf propagate through a sum); only a sum that
    overflowed or hit one pays for the element-wise check."""
    import math

    import torch

    return math.isfinite(float(w.sum())) or bool(torch.isfinite(w).all())


def encoded_size(n: int, type_name: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return n // block * size


def encode(w: torch.Tensor, type_name: str, scratch: Scratch) -> np.ndarray:
    """``w`` (fp32, C order) stored as ``type_name``, bytes identical to ``gguf.quants.quantize`` (K-quants:
    to ggml's ``quantize_row_*_ref``; values beyond ±65504 refused as for F16): a flat
    uint8 array in the scratch byte buffer (the values have been decoded from it already), or the
    package's own output for the types it alone encodes. :class:`NotFinite` when ``w`` holds NaN/Inf:
    checked a cache-sized block at a time just before that block is encoded (one read of ``w`` from
    memory for both)."""
    import torch

    n = w.numel()
    flat = w.reshape(-1)
    if type_name in ("F16", "BF16"):
        out = scratch.stored(2 * n).view(torch.float16 if type_name == "F16" else torch.bfloat16)
        for s in range(0, n, _BLOCK_VALUES):
            block = flat[s : s + _BLOCK_VALUES]
            if not all_finite(block):
                raise NotFinite
            out[s : s + _BLOCK_VALUES].copy_(block)
            if not all_finite(out[s : s + _BLOCK_VALUES]):  # finite in fp32, beyond F16's ±65504: refused too
                raise NotFinite
        return out.view(torch.uint8).numpy()
    if type_name == "Q8_0":
        out = scratch.stored(encoded_size(n, "Q8_0"))
        _q8_0(flat.view(-1, _Q8_BLOCK), out.view(-1, _Q8_BYTES))
        return out.numpy()
    if not all_finite(flat):
        raise NotFinite
    if type_name == "F32":
        return flat.view(torch.uint8).numpy()
    from loratools.ops.merge import kquant_encode

    if kquant_encode.encodable(type_name):
        if float(flat.abs().max()) > kquant_encode.MAX_ABS:  # its F16 super-block scales would overflow
            raise NotFinite
        out = scratch.stored(encoded_size(n, type_name)).numpy()
        return kquant_encode.quantize(flat.numpy(), type_name, threads=torch.get_num_threads(), out=out)
    import gguf

    return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[type_name]).reshape(-1).view("uint8")


def _q8_0(values: torch.Tensor, out: torch.Tensor) -> None:
    """``gguf.quants.Q8_0.quantize_blocks`` (bit-exact to ggml's ``quantize_row_q8_0_ref``) into ``out``
    (n_blocks × 34 bytes), a cache-sized chunk at a time in two reused buffers.

    The package rounds ``y = x·id`` half away from zero as ``floor(a) + floor(2·(a − floor(a)))``, a = |y|.
    Here ``trunc(copysign(|x|·id + c, x))`` with c = 0.5 − 2⁻²⁵, the float just below ½: for every float
    0 ≤ a < 2²² (|y| ≤ 127 here), ``floor(a + c)`` equals the package's rounding — checked over all
    1.25·10⁹ of them — and fp32 rounding is symmetric in sign, ``|x|·id = |x·id|`` for id ≥ 0, and the
    int8 cast truncates: 6 passes instead of 12. A block whose ``1/d`` overflows (d < 2⁻¹²⁸) goes to the
    package."""
    import math

    import gguf
    import numpy as np
    import torch

    chunk = _chunk_blocks()
    mag = torch.empty(chunk, _Q8_BLOCK)
    d_buf, inv_buf = torch.empty(chunk, 1), torch.empty(chunk, 1)
    scales, quants = out[:, :2].view(torch.float16), out[:, 2:].view(torch.int8)
    for s in range(0, values.shape[0], chunk):
        x = values[s : s + chunk]
        k = x.shape[0]
        a, d, inv = mag[:k], d_buf[:k], inv_buf[:k]
        torch.abs(x, out=a)
        torch.amax(a, dim=1, keepdim=True, out=d)  # NaN/Inf in a block: its d too (amax propagates NaN)
        d.div_(127)
        torch.reciprocal(d, out=inv)
        if not math.isfinite(float(d.sum()) + float(inv.sum())):  # all d ≥ 0: rare, look closer
            if not all_finite(d):
                raise NotFinite
            inv.masked_fill_(d == 0, 0.0)
            if bool(torch.isinf(inv).any()):  # d below 2⁻¹²⁸: the package's own arithmetic for this chunk
                with np.errstate(over="ignore", invalid="ignore"):  # its x·inf: NaN, cast as it casts it
                    q = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
                out[s : s + k].copy_(torch.from_numpy(q.reshape(k, _Q8_BYTES)))
                continue
        a.mul_(inv).add_(_HALF_DOWN)
        torch.copysign(a, x, out=a)
        scales[s : s + k].copy_(d)
        quants[s : s + k].copy_(a)


def write_all(fd: int, data: Any) -> None:
    """All of ``data`` (a bytes-like buffer) written at ``fd``'s position."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError("short write")
        view = view[n:]


def copy_range(src: int, offset: int, n: int, dst: int) -> None:
    """``n`` bytes of ``src`` from ``offset`` appended at ``dst``'s position, file to file in the kernel
    (``copy_file_range``, else ``sendfile``, else read and write)."""
    left = n
    for call in ("copy_file_range", "sendfile"):
        fn = getattr(os, call, None)
        if fn is None:
            continue
        try:
            while left:
                k = fn(src, dst, left, offset) if call == "copy_file_range" else fn(dst, src, offset, left)
                if k <= 0:
                    raise OSError(f"short {call} at offset {offset}")
                offset, left = offset + k, left - k
            return
        except OSError as e:
            if not _unsupported(e):
                raise
    while left:
        chunk = os.pread(src, min(left, 1 << 24), offset)
        if not chunk:
            raise OSError(f"short read at offset {offset}")
        write_all(dst, chunk)
        offset, left = offset + len(chunk), left - len(chunk)


def read_exact(fd: int, offset: int, buf: Any) -> None:
    """Fill ``buf`` (a writable buffer) from ``fd`` at ``offset``."""
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        k = os.preadv(fd, [view[done:]], offset + done)
        if k <= 0:
            raise OSError(f"short read at offset {offset + done}")
        done += k


def same_bytes(fd: int, offset: int, want: Any, chunk: int = 1 << 24) -> bool:
    """Whether ``fd`` holds exactly the bytes of ``want`` (a buffer, or ``(fd, offset, n)`` of another
    file) at ``offset``, read back in chunks into reused buffers."""
    other = want if isinstance(want, tuple) else None
    n = other[2] if other else memoryview(want).nbytes
    view = None if other else memoryview(want).cast("B")
    have, theirs, done = bytearray(min(chunk, n)), bytearray(min(chunk, n) if other else 0), 0
    while done < n:
        k = min(chunk, n - done)
        if k < len(have):
            have, theirs = bytearray(k), bytearray(k if other else 0)
        read_exact(fd, offset + done, have)
        if other:
            read_exact(other[0], other[1] + done, theirs)
        if have != (theirs if other else view[done : done + k]):  # bytearray ==: one memcmp
            return False
        done += k
    return True


class DataSection:
    """A GGUF data section appended at ``fd``'s position, laid out as ``GGUFWriter.write_tensor_data``
    lays it out: zeros up to the alignment, then each tensor zero-padded to a multiple of it.

    The writes run on one background thread, in order, so that writing a tensor (a page-cache copy that
    the kernel throttles while dirty pages are flushed: 2.3 s of a 6 s merge measured) overlaps merging
    the next; :meth:`write` and :meth:`copy` return a future, :meth:`close` waits for all and raises the
    first error."""

    def __init__(self, fd: int, alignment: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.fd, self.alignment = fd, alignment
        self.pos = os.lseek(fd, 0, os.SEEK_CUR)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loratools-gguf-write")
        self._pending: list[Any] = []
        self._submit(lambda: None, 0)

    def _submit(self, job: Any, n: int, pad_after: bool = True) -> Any:
        """Run ``job`` (writing ``n`` bytes at the end of the file) on the writer, then the padding (none
        with ``pad_after=False``: a piece of a tensor written in parts, see :meth:`pad`)."""
        pad = -(self.pos + n) % self.alignment if pad_after else 0
        self.pos += n + pad

        def run() -> None:
            job()
            if pad:
                write_all(self.fd, bytes(pad))

        future = self._pool.submit(run)
        self._pending.append(future)
        return future

    def write(self, data: Any, pad: bool = True) -> Any:
        """Queue ``data`` (a buffer left untouched until the returned future is done)."""
        return self._submit(lambda: write_all(self.fd, data), memoryview(data).nbytes, pad)

    def copy(self, src: int, offset: int, n: int, pad: bool = True) -> Any:
        return self._submit(lambda: copy_range(src, offset, n, self.fd), n, pad)

    def pad(self) -> Any:
        """The padding after a tensor written in pieces (``pad=False``)."""
        return self._submit(lambda: None, 0)

    def close(self, wait_only: bool = False) -> None:
        """Wait for every queued write; raise the first failure (not with ``wait_only``, on another error)."""
        try:
            for f in self._pending:
                if wait_only:
                    f.exception()
                else:
                    f.result()
        finally:
            self._pool.shutdown(wait=True)


def _unsupported(e: OSError) -> bool:
    import errno

    # EXDEV: older kernels across filesystems; ENOTSOCK: macOS sendfile writes only to sockets
    return e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ENOTSOCK)
