"""Output conventions shared by every command: human text, ``--json``, quiet mode, progress on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

T = TypeVar("T")
SCHEMA_VERSION = 1


class Output:
    """Where a command's results go. ``json`` prints one JSON object; ``quiet`` prints nothing but errors."""

    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet

    def result(self, data: dict[str, Any], human: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Print ``data`` as JSON (with ``schema_version`` first) or through ``human``."""
        if self.json_mode:
            payload = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in data.items() if k != "schema_version"}}
            click.echo(json.dumps(payload, indent=2, default=_jsonable))
        elif not self.quiet and human is not None:
            human(data)

    def line(self, text: str = "") -> None:
        if not self.quiet and not self.json_mode:
            click.echo(text)

    def note(self, text: str) -> None:
        """A status line on stderr (skipped when quiet)."""
        if not self.quiet:
            click.echo(text, err=True)

    def table(self, headers: list[str], rows: Iterable[Iterable[Any]]) -> None:
        if self.quiet or self.json_mode:
            return
        click.echo(render_table(headers, rows))

    def progress(self, items: Iterable[T], total: int | None = None, label: str = "") -> Iterator[T]:
        """Iterate with a progress bar on stderr, only when stderr is a terminal and not quiet."""
        if self.quiet or self.json_mode or not sys.stderr.isatty():
            yield from items
            return
        from rich.progress import Progress

        with Progress(transient=True, console=_stderr_console()) as bar:
            task = bar.add_task(label, total=total)
            for item in items:
                yield item
                bar.advance(task)

    @contextmanager
    def progress_callback(self, total: int, label: str = "") -> Iterator[Callable[[int], None]]:
        """A ``callback(n)`` that advances a stderr progress bar by n (a no-op when not a terminal)."""
        if self.quiet or self.json_mode or not sys.stderr.isatty():
            yield lambda n=1: None
            return
        from rich.progress import Progress

        with Progress(transient=True, console=_stderr_console()) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n=1: bar.advance(task, n)


def _stderr_console():  # noqa: ANN202
    from rich.console import Console

    return Console(stderr=True)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj) if isinstance(obj, set | frozenset) else list(obj)
    return str(obj)


def render_table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A plain, fixed-width text table (stable for tests and docs)."""
    body = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in body]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def get_output(ctx: click.Context, json_mode: bool = False) -> Output:
    quiet = bool(ctx.find_root().obj and ctx.find_root().obj.get("quiet"))
    return Output(json_mode=json_mode, quiet=quiet)
