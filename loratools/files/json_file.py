"""Small JSON files (configs, indexes) read with a size cap and one-line errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratools.errors import FormatError, InputNotFoundError, UnsafeInputError

MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(path: Path, what: str = "JSON file") -> Any:
    """A small JSON file, size-capped, with a FormatError naming the file on failure."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: no such file", path=path) from None
    except OSError as exc:  # a symlink loop, a name too long, no permission to look
        raise FormatError(f"{path}: cannot read the {what} ({exc.strerror or exc})", path=path) from None
    if size > MAX_JSON_BYTES:
        raise UnsafeInputError(f"{path}: {what} of {size} bytes exceeds the {MAX_JSON_BYTES} byte limit", path=path)
    if not path.is_file():
        raise FormatError(f"{path}: the {what} is not a file (a folder or a device)", path=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the {what} ({exc.strerror or exc})", path=path) from None
    except RecursionError:
        raise UnsafeInputError(f"{path}: {what} is nested too deeply to parse", path=path) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})", hint=f"fix or re-create the {what}", path=path) from None
