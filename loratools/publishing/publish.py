"""Atomic publishing of outputs, disk-space preflight, and the provenance record.

Every writing command writes into a temporary sibling of its output (``.NAME.loratools-tmp-PID-XXXX``)
and renames it into place at the end, so a killed run never leaves a finished-looking output. With
``overwrite`` the old output is moved aside, the new one renamed in, then the old one deleted — only if
output_guard proves it a previous loratools output. SIGTERM and SIGHUP (default action: die on the spot)
become an exception while an output is being written, so the temporary is removed as for Ctrl-C, and
no signal can land between moving the old output aside and renaming the new one in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from loratools.errors import DiskSpaceError, OutputExistsError, UsageError
from loratools.publishing.output_guard import (
    entries_summary,
    location_problem,
    previous_file_problem,
    previous_output_problem,
)
from loratools.publishing.write_errors import check_writable, output_write_errors  # read-only, full disk

SCHEMA_VERSION = 1
METADATA_KEY = "loratools"
_TMP_MARK = ".loratools-tmp-"
_OLD_MARK = ".loratools-old-"
#: files up to this size are hashed whole for provenance; larger ones by size and header
HASH_LIMIT = 256 * 1024 * 1024


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_target(target: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> Path:
    """Refuse an output that exists (unless ``overwrite``), or lies on, inside or around an input."""
    out = Path(target).resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if out == src or _inside(out, src) or _inside(src, out):
            lost = f"; --overwrite would have removed {entries_summary(out)}" if overwrite and out.is_dir() else ""
            raise OutputExistsError(
                f"{target}: the output would overwrite or sit inside the input {inp}{lost}",
                hint="choose an output path outside every input",
                path=target,
            )
    if out.exists() or out.is_symlink():
        check_replaceable(target, out, overwrite)
    return out


def check_replaceable(target: str | Path, out: Path, overwrite: bool) -> None:
    """Refuse to replace the existing ``out`` (``target`` resolved) unless ``overwrite`` and it is ours.

    Never replaced: the working directory, the home folder and their ancestors; a folder is replaced
    only when output_guard proves it one previous loratools output, and a single file only when it
    carries our provenance record (output_guard.previous_file_problem). The message says what would
    have been removed.
    """
    hint = "write to a new path (for example -o out/NAME), or delete the folder yourself if you mean it"
    where = location_problem(out)
    if where is not None:
        raise OutputExistsError(
            f"refusing to replace {target}: it {where}; --overwrite would have removed {entries_summary(out)}",
            hint=hint,
            path=target,
        )
    if not overwrite:
        raise OutputExistsError(f"{target} exists already", hint="pass --overwrite to replace it", path=target)
    if out.is_dir() and not out.is_symlink():
        why = previous_output_problem(out)
        if why is not None:
            raise OutputExistsError(
                f"refusing to replace {target}: {target} is not a previous loratools output ({why}); "
                f"--overwrite would have removed {entries_summary(out)}",
                hint=hint,
                path=target,
            )
    else:
        why = previous_file_problem(out)
        if why is not None:
            raise OutputExistsError(
                f"refusing to replace {target}: it is not a previous loratools output ({why})",
                hint="write to a new path, or delete the file yourself if you mean it",
                path=target,
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(target: str | Path) -> list[Path]:
    """Temporary siblings of ``target`` left by runs that are no longer alive."""
    out = Path(target).absolute()
    found = []
    if not out.parent.is_dir():
        return found
    for p in out.parent.iterdir():
        for mark in (_TMP_MARK, _OLD_MARK):
            prefix = f".{out.name}{mark}"
            if p.name.startswith(prefix):
                pid = p.name[len(prefix) :].split("-", 1)[0]
                if not pid.isdigit() or not _pid_alive(int(pid)):
                    found.append(p)
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_disk_space(target: str | Path, nbytes: int, *, margin: float = 1.02) -> None:
    """Raise :class:`DiskSpaceError` when the file system of ``target`` lacks ``nbytes`` (+2%)."""
    parent = Path(target).absolute().parent
    while not parent.exists():
        parent = parent.parent
    check_writable(target, parent)  # a read-only folder is not a lack of space
    free = shutil.disk_usage(parent).free
    need = int(nbytes * margin)
    if need > free:
        raise DiskSpaceError(
            f"{target}: needs {format_bytes(need)} but only {format_bytes(free)} is free on {parent}",
            hint="free some space or write the output elsewhere",
            path=target,
        )


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived while an output was being written (exit status 128 + signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = f"terminated by {signal.Signals(signum).name}; nothing was published"


_CAUGHT = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
_state = {"depth": 0, "deferring": 0, "pending": None, "previous": {}}


def _on_signal(signum: int, frame: Any) -> None:
    if _state["deferring"]:
        _state["pending"] = signum
        return
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_caught() -> Iterator[None]:
    """While writing: SIGTERM/SIGHUP raise Terminated (only where their action is the default death)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"] == 0:
        _state["previous"] = {}
        for sig in _CAUGHT:
            if signal.getsignal(sig) is signal.SIG_DFL:
                _state["previous"][sig] = signal.signal(sig, _on_signal)
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            for sig, previous in _state["previous"].items():
                signal.signal(sig, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """A signal that arrives inside the block is raised when the block ends (main thread: only it gets signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        pending, _state["pending"] = _state["pending"], None
        if pending is not None and not _state["deferring"]:
            raise Terminated(pending)


@contextlib.contextmanager
def atomic_output(
    target: str | Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    directory: bool = True,
    expected_bytes: int | None = None,
) -> Iterator[Path]:
    """Yield a temporary path to write into; publish it at ``target`` when the block succeeds.

    ``directory`` says whether the output is a folder (created empty) or a single file (the caller
    creates it). Stale temporaries of killed runs are removed first. On error nothing is published.
    """
    if directory and Path(target).suffix in _FILE_SUFFIXES:  # `merge FOLDER -o x.safetensors` made a folder
        raise UsageError(
            f"{target}: this output is a folder, but the name is that of a {Path(target).suffix} file",
            hint="give a folder name (e.g. -o merged/); a single-file output comes from a single-file input",
        )
    out = check_output_target(target, inputs, overwrite)
    with output_write_errors(target, out):  # a read-only or full file system: one line naming the output
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_temporaries(out):
            _remove(stale)
        if expected_bytes is not None:
            check_disk_space(out, expected_bytes)
        with _signals_caught():
            yield from _publish(target, out, overwrite, directory)


def _publish(target: str | Path, out: Path, overwrite: bool, directory: bool) -> Iterator[Path]:
    tmp = out.parent / f".{out.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        if not (tmp.exists() or tmp.is_symlink()):
            raise UsageError(f"{target}: nothing was written")
        old = None
        if out.exists() or out.is_symlink():  # it may have appeared (or changed) while we worked
            check_replaceable(target, out, overwrite)
            old = out.parent / f".{out.name}{_OLD_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        with _signals_deferred():  # the old output is never left moved aside without the new one in place
            if old is not None:
                os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                if old is not None:
                    os.replace(old, out)
                raise
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def file_digest(path: str | Path) -> dict[str, Any]:
    """sha256 of a file (whole for files up to HASH_LIMIT; else of its first MiB, with the size)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return {"path": p.name, "size": size, "sha256": h.hexdigest()}
        h.update(f.read(1 << 20))
    return {"path": p.name, "size": size, "sha256_first_mib": h.hexdigest()}


def describe_input(path: str | Path, hub: dict[str, str] | None = None) -> dict[str, Any]:
    """Provenance of one input: its Hub id and revision, or its files with their digests."""
    if hub is None:
        from loratools.publishing.hub import hub_info_for  # hf:// specs and paths in the Hugging Face cache

        hub = hub_info_for(path)
    if hub:
        return dict(hub)
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".json", ".onnx_adapter")]
    return {"path": str(p), "files": [file_digest(f) for f in weights[:64]]}


def provenance(operation: str, parameters: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The record written under the ``loratools`` metadata key of every safetensors output."""
    from loratools import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "loratools_version": __version__,
        "operation": operation,
        "parameters": parameters,
        "inputs": inputs,
    }


def provenance_metadata(record: dict[str, Any]) -> dict[str, str]:
    return {METADATA_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"))}


def read_provenance(metadata: dict[str, str] | None) -> dict[str, Any] | None:
    """The provenance record from safetensors metadata, or None (also for malformed records)."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        rec = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


_FILE_SUFFIXES = (".safetensors", ".bin", ".onnx_adapter", ".pt", ".gguf")


def check_output_layout(name: str, layout: str, path: str | Path) -> None:
    """Refuse a folder-looking path for a one-file format and a file-looking path for a folder format."""
    text = str(path)
    if layout == "file" and (text.endswith(("/", "\\")) or Path(path).is_dir()):
        raise UsageError(
            f"{path}: the {name} format writes one file, but this is a folder path",
            hint="name the file, e.g. -o out.safetensors",
        )
    if layout == "folder" and Path(path).suffix in _FILE_SUFFIXES:
        raise UsageError(
            f"{path}: the {name} format writes a folder, but this names a {Path(path).suffix} file",
            hint="give a folder name (e.g. -o out/), or choose a one-file format with --to",
        )
