"""Hub references (``hf://ORG/NAME[@REV][/PATH]`` or a bare ``ORG/NAME``) -> local paths.

Placeholder until the Hub issue lands: only local paths are resolved here.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputNotFoundError


def resolve_input(spec: str | Path, purpose: str = "adapter") -> Path:
    """A local path for ``spec``; raises InputNotFoundError naming what was looked for."""
    p = Path(spec)
    if not p.exists():
        raise InputNotFoundError(f"{spec}: no such {purpose} file or folder", path=p)
    return p
