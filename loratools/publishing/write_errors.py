"""OS errors met while writing an output, as one line that names the output.

``atomic_output`` writes into a temporary sibling (``.NAME.loratools-tmp-PID-XXXX``); a read-only file
system, a folder without write permission or a disk that fills up mid-write fails there with the
temporary's name in the OS message. The user named ``-o NAME``: say that, what is wrong and what to do.
The temporary is removed by the publisher either way.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from loratools.errors import DiskSpaceError, LoratoolsError, OutputWriteError

#: errno -> (what went wrong, hint); {parent} is the output's folder
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_REFUSED = {
    errno.EROFS: ("{parent} is on a read-only file system", "write the output to a writable folder (-o elsewhere)"),
    errno.EACCES: (
        "no permission to write in {parent}",
        "write the output to a folder you may write to, or fix its permissions",
    ),
    errno.EPERM: ("the operating system refused the write in {parent}", "write the output to another folder"),
    errno.EFBIG: (
        "a file is larger than the file system of {parent} (or the shell's `ulimit -f`) allows",
        "write the output to a file system that holds files this large (FAT32: 4 GB at most), or raise `ulimit -f`",
    ),
}


def _concerns(exc: OSError, out: Path) -> bool:
    """Whether the OS error is about the output: its temporary, something in it, or a folder above it."""
    if exc.errno in _FULL or exc.errno == errno.EFBIG or not exc.filename:
        return True  # a write that found the disk full (or the file too large) names no file: only an output
    for name in (exc.filename, exc.filename2):
        if not name:
            continue
        p = Path(str(name)).absolute()
        if p.parent == out.parent and p.name.startswith(f".{out.name}.loratools-"):
            return True
        if p == out or out in p.parents or p in out.parents:
            return True
        if any(q.name.startswith(f".{out.name}.loratools-") for q in p.parents if q.parent == out.parent):
            return True
    return False


def describe(exc: OSError, target: str | Path, out: Path | None = None) -> LoratoolsError | None:
    """The one-line error for an OS error met writing ``target`` (``out``: it resolved), or None when the
    error is about something else."""
    out = (out or Path(target)).absolute()
    if not isinstance(exc.errno, int) or isinstance(exc, LoratoolsError) or not _concerns(exc, out):
        return None
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folder the output's missing folders could not be made in
    if exc.errno in _FULL:
        return DiskSpaceError(
            f"{target}: the disk filled up while writing the output ({exc.strerror or 'no space left'}); "
            "nothing was published",
            hint=f"free some space on the file system of {parent}, or write the output elsewhere",
            path=target,
        )
    if exc.errno in _REFUSED:
        what, hint = _REFUSED[exc.errno]
        return OutputWriteError(
            f"{target}: cannot write the output: {what.format(parent=parent)}; nothing was published",
            hint=hint,
            path=target,
            code=exc.errno,
        )
    return None


@contextlib.contextmanager
def output_write_errors(target: str | Path, out: Path | None = None) -> Iterator[None]:
    """Turn an OS error about the output ``target`` into a :class:`LoratoolsError` naming it."""
    try:
        yield
    except OSError as exc:
        mapped = describe(exc, target, out)
        if mapped is None:
            raise
        raise mapped from exc
    except Exception as exc:  # safetensors' writer wraps the OS error: "I/O error: File too large (os error 27)"
        code = _wrapped_errno(exc)
        mapped = None if code is None else describe(OSError(code, os.strerror(code)), target, out)
        if mapped is None:
            raise
        raise mapped from exc


def _wrapped_errno(exc: Exception) -> int | None:
    """The errno inside a ``safetensors.SafetensorError`` from a write that found the disk full or the file too large
    (Rust's io::Error text), else None: its text names no file, so other errors may be about an input."""
    import re

    if type(exc).__name__ != "SafetensorError":
        return None
    found = re.search(r"\(os error (\d+)\)", str(exc))
    code = int(found.group(1)) if found else None
    return code if code in _FULL or code == errno.EFBIG else None  # errors only a write meets (it names no file)


def check_writable(target: str | Path, folder: Path) -> None:
    """Refuse an output whose existing ``folder`` cannot be written (before a space check blames free space)."""
    if os.access(folder, os.W_OK):
        return
    readonly = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    code = errno.EROFS if readonly else errno.EACCES
    mapped = describe(OSError(code, os.strerror(code), str(folder)), target, Path(target).absolute())
    if mapped is not None:
        raise mapped
