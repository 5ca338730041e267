"""``--include`` / ``--exclude`` module filters: regexes searched in canonical module names."""

from __future__ import annotations

import re
from collections.abc import Callable

from loratools.errors import UsageError


def _compile(pattern: str | None, option: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{option} {pattern!r} is not a valid regular expression: {exc}") from exc


def module_filter(include: str | None = None, exclude: str | None = None) -> Callable[[str], bool]:
    """A predicate: True for names that ``include`` matches (re.search) and ``exclude`` does not."""
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")

    def keep(name: str) -> bool:
        if inc is not None and not inc.search(name):
            return False
        return not (exc is not None and exc.search(name))

    return keep
