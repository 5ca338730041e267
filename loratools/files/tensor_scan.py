"""Huge tensors of a checked safetensors header scanned in chunks instead of loaded: the first NaN/Inf and
whether any value is non-zero, at one chunk of memory whatever the tensor's size (``validate``, ``info``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loratools.errors import FormatError
from loratools.files.safetensors_file import DTYPES, TensorInfo, torch_dtype

#: bytes read at a time when a tensor is scanned instead of loaded (NaN/Inf and all-zero checks of huge tensors)
SCAN_CHUNK_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class TensorScan:
    """What a chunked read of one float tensor found: the first NaN/Inf (flat index and value) and any non-zero."""

    first_nonfinite: int | None
    value: float | None
    any_nonzero: bool
    nonfinite: int = 0  # how many NaN/Inf values
    shape: tuple[int, ...] = ()

    def index(self) -> list[int]:
        """The first NaN/Inf's index in the tensor's shape."""
        flat, out = int(self.first_nonfinite or 0), []
        for d in reversed(self.shape):
            flat, i = divmod(flat, d) if d else (flat, 0)
            out.append(i)
        return out[::-1]


def scan_tensor(path: str | Path, info: TensorInfo, chunk_bytes: int = SCAN_CHUNK_BYTES) -> TensorScan:
    """Scan a float tensor of a checked header in chunks of ``chunk_bytes`` (pread into one reused buffer):
    memory stays at one chunk whatever the tensor's size."""
    import torch

    itemsize = DTYPES[info.dtype][1]
    step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
    buf = torch.empty(min(step, max(info.nbytes, itemsize)), dtype=torch.uint8)
    view = memoryview(buf.numpy())
    nonzero, nonfinite, first, value = False, 0, None, None
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in range(info.start, info.end, step):
            n = min(step, info.end - start)
            pos = 0
            while pos < n:
                got = os.preadv(fd, [view[pos:n]], start + pos)
                if got <= 0:
                    raise FormatError(f"{path}: unexpected end of file reading tensor {info.name!r}", path=path)
                pos += got
            x = buf[:n].view(torch_dtype(info.dtype))
            x = x if x.element_size() > 1 else x.float()  # isfinite has no fp8 kernels
            finite = torch.isfinite(x)
            if not bool(finite.all()):
                bad = ~finite
                if first is None:
                    i = int(bad.nonzero()[0])
                    first, value = (start - info.start) // itemsize + i, float(x[i])
                nonfinite += int(bad.sum())
            nonzero = nonzero or bool(x.any())
    finally:
        os.close(fd)
    return TensorScan(first, value, nonzero, nonfinite, tuple(info.shape))
