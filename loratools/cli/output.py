"""Output conventions shared by every command: human text, ``--json``, quiet mode, progress on stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

T = TypeVar("T")
SCHEMA_VERSION = 1
#: ``--progress`` values: a bar on a terminal only (auto), text lines always (plain), none (off)
PROGRESS_MODES = ("auto", "plain", "off")
PROGRESS_ENV = "LORATOOLS_PROGRESS"


class Output:
    """Where a command's results go. ``json`` prints one JSON object; ``quiet`` prints nothing but errors.

    ``progress``: ``auto`` draws a bar on stderr when it is a terminal; ``plain`` prints text lines
    (``merging: 40%``) on stderr whatever it is (CI and Slurm logs); ``off`` shows none. Quiet and
    ``--json`` runs show no progress either way.
    """

    def __init__(
        self, json_mode: bool = False, quiet: bool = False, progress: str = "auto", state: dict | None = None
    ) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.progress_mode = progress
        self._state = state  # the run's settings: result() records that the one JSON object is out

    def _progress_style(self) -> str | None:
        """``bar``, ``plain`` or None (no progress at all)."""
        if self.quiet or self.json_mode or self.progress_mode == "off":
            return None
        if self.progress_mode == "plain":
            return "plain"
        return "bar" if sys.stderr.isatty() else None

    def result(self, data: dict[str, Any], human: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Print ``data`` as JSON (with ``schema_version`` first) or through ``human``."""
        if self.json_mode:
            payload = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in data.items() if k != "schema_version"}}
            click.echo(json.dumps(payload, indent=2, default=_jsonable))
            if self._state is not None:
                self._state["json_emitted"] = True  # an error after this adds no second object
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
        """Iterate with progress on stderr (see the class docstring for when it shows)."""
        style = self._progress_style()
        if style is None:
            yield from items
            return
        if style == "plain":
            with self.progress_callback(total or 0, label) as advance:
                for item in items:
                    yield item
                    advance(1)
            return
        from rich.progress import Progress

        with Progress(transient=True, console=_stderr_console()) as bar:
            task = bar.add_task(label, total=total)
            for item in items:
                yield item
                bar.advance(task)

    @contextmanager
    def progress_callback(self, total: int, label: str = "") -> Iterator[Callable[[int], None]]:
        """A ``callback(n)`` that advances stderr progress by n (a no-op when no progress shows)."""
        style = self._progress_style()
        if style is None:
            yield lambda n=1: None
            return
        if style == "plain":
            lines = PlainProgress(total, label)
            yield lines.advance
            lines.finish()
            return
        from rich.progress import Progress

        with Progress(transient=True, console=_stderr_console()) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n=1: bar.advance(task, n)


class PlainProgress:
    """Progress as text lines on stderr: one per 10% of a known total, one per 100 steps otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done, self._shown = total, label or "progress", 0, -1

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.total > 0:
            step = min(10, 10 * self.done // self.total)
            if step > self._shown:
                self._shown = step
                click.echo(f"{self.label}: {10 * step}%", err=True)
        elif self.done // 100 > self._shown:
            self._shown = self.done // 100
            click.echo(f"{self.label}: {self.done}", err=True)

    def finish(self) -> None:
        if self.total > 0 and self._shown < 10:
            click.echo(f"{self.label}: 100%", err=True)
        elif self.total <= 0:
            click.echo(f"{self.label}: done ({self.done})", err=True)


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
    """The command's Output: ``-q`` and ``--progress`` given before or after the command name, or
    ``LORATOOLS_PROGRESS`` in the environment."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    settings = root.obj
    progress = settings.get("progress") or os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if progress not in PROGRESS_MODES:
        raise click.BadParameter(
            f"{PROGRESS_ENV}={progress!r} is not one of {', '.join(PROGRESS_MODES)}", param_hint=PROGRESS_ENV
        )
    return Output(json_mode=json_mode, quiet=bool(settings.get("quiet")), progress=progress, state=settings)
