"""The ``loratools`` click group and the error boundary.

Command modules import only click and cli helpers at module level; the library (and torch) is imported
inside each command, so ``loratools --help`` stays fast.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import click

from loratools import __version__
from loratools.cli.output import PROGRESS_ENV, PROGRESS_MODES

#: command name -> "module:attribute" (module relative to loratools.cli)
COMMANDS: dict[str, str] = {
    "info": "info:info",
    "merge": "merge:merge",
    "verify": "verify:verify",
    "validate": "validate:validate",
    "resize": "resize:resize",
    "rescale": "rescale:rescale",
    "diff": "diff:diff",
    "combine": "combine:combine",
    "extract": "extract:extract",
    "spectrum": "spectrum:spectrum",
    "push": "push:push",
    "convert": "convert:convert",
    "export-onnx": "export_onnx:export_onnx",
    "bench": "bench:bench",
}


class LazyGroup(click.Group):
    """Loads each command module on first use; the listing still shows every command's short help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        """The error boundary: every command's errors pass through here (also under CliRunner)."""
        args = [*getattr(ctx, "_protected_args", ()), *ctx.args]  # the command name and its arguments
        return _boundary(lambda: super(LazyGroup, self).invoke(ctx), _JsonErrors(ctx, args))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return _with_common_options(getattr(importlib.import_module(f"{__package__}.{module}"), attr))


def _remember(key: str):  # noqa: ANN202
    """A callback storing an option's value in the root context (``-q`` and ``--progress`` anywhere)."""

    def store(ctx: click.Context, param: click.Parameter, value: object) -> object:
        root = ctx.find_root()
        if root.obj is None:
            root.obj = {}
        if value:
            root.obj[key] = value
        return value

    return store


def _quiet_option() -> click.Option:
    return click.Option(
        ["-q", "--quiet"],
        is_flag=True,
        expose_value=False,
        callback=_remember("quiet"),
        help="Print nothing but errors.",
    )


def _progress_option() -> click.Option:
    return click.Option(
        ["--progress"],
        type=click.Choice(PROGRESS_MODES),
        default=None,
        expose_value=False,
        callback=_remember("progress"),
        help=f"Progress on stderr: a bar on a terminal (auto), text lines for logs (plain), off. Env: {PROGRESS_ENV}.",
    )


def _with_common_options(command: click.Command) -> click.Command:
    """Every command also takes -q and --progress after its name (``loratools info X -q``)."""
    names = {opt for p in command.params for opt in getattr(p, "opts", ())}
    if "--quiet" not in names:
        command.params.append(_quiet_option())
    if "--progress" not in names:
        command.params.append(_progress_option())
    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="loratools")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (also after the command name).")
@click.option(
    "--progress",
    type=click.Choice(PROGRESS_MODES),
    default=None,
    help=f"Progress on stderr: auto (a bar on a terminal), plain (text lines, for logs), off. Env: {PROGRESS_ENV}.",
)
@click.pass_context
def cli(ctx: click.Context, quiet: bool, progress: str | None) -> None:
    """Read, validate, diff, resize, combine, convert, merge, export and push LoRA adapters.

    \b
    Examples:
      loratools info adapter/
      loratools merge base/ adapter/ -o merged/
      loratools resize adapter/ --rank 2 -o small/

    Exit codes: 0 success, 1 the command ran and found problems, 2 unusable input or usage error.
    Set LORATOOLS_DEBUG=1 to see tracebacks.
    """
    ctx.obj = {"quiet": quiet, "progress": progress}


class _JsonErrors:
    """With ``--json`` anywhere in a command's arguments, an error is also one JSON object on stdout
    (docs/json.md#errors) — unless the command printed its one object already (validate's report)."""

    def __init__(self, ctx: click.Context, args: list[str]) -> None:
        self.ctx = ctx
        self.command = args[0] if args else None
        words = args[: args.index("--")] if "--" in args else args
        self.enabled = "--json" in words[1:]

    def emit(self, kind: str, message: str, hint: str | None, code: int, path: object = None) -> None:
        state = self.ctx.obj if isinstance(self.ctx.obj, dict) else {}
        if not self.enabled or state.get("json_emitted"):
            return
        from loratools.cli.output import SCHEMA_VERSION

        error = {"type": kind, "message": message, "hint": hint, "exit_code": code}
        if path is not None:
            error["path"] = str(path)
        payload = {"schema_version": SCHEMA_VERSION, "command": self.command, "ok": False, "error": error}
        click.echo(json.dumps(payload, indent=2))
        state["json_emitted"] = True


def _fail(message: str, hint: str | None, code: int, json_errors: _JsonErrors | None = None, **error) -> None:  # noqa: ANN003
    if json_errors is not None:
        json_errors.emit(error.get("kind") or "Error", message, hint, code, error.get("path"))
    click.echo(f"Error: {message}", err=True)
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    raise click.exceptions.Exit(code)


def _os_error_line(exc: OSError) -> tuple[str, str | None]:
    """An OS error not about an output (those are mapped where outputs are written): path first."""
    import errno

    what = exc.strerror or str(exc)
    line = f"{exc.filename}: {what}" if exc.filename else f"{exc.__class__.__name__}: {exc}"
    hint = None
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = "free some space (the Hugging Face cache HF_HOME and the temporary folder TMPDIR count too)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "check the path's permissions, or use a path you may read and write"
    return line, hint


def _boundary(run, json_errors: _JsonErrors | None = None):  # noqa: ANN001, ANN202
    """Run a command; turn errors into one line plus a hint (no traceback unless LORATOOLS_DEBUG=1)."""
    from loratools.errors import LoratoolsError
    from loratools.publishing.publish import Terminated

    if os.environ.get("LORATOOLS_DEBUG") == "1":
        return _with_warning_lines(run, json_errors)
    j = json_errors
    try:
        return _with_warning_lines(run, json_errors)
    except click.exceptions.Exit:
        raise
    except click.ClickException as exc:  # usage errors: click prints them (stderr) and exits 2
        if j is not None:
            kind = "UsageError" if isinstance(exc, click.UsageError) else exc.__class__.__name__
            j.emit(kind, exc.format_message(), None, exc.exit_code)
        raise
    except click.exceptions.Abort:
        if j is not None:
            j.emit("Abort", "aborted", None, 1)
        raise
    except BrokenPipeError:  # stdout's reader left (`loratools info a/ | head -1`)
        _closed_stdout()
    except LoratoolsError as exc:
        _fail(exc.message, exc.hint, exc.exit_code, j, kind=exc.__class__.__name__, path=exc.path)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was published", None, 130, j, kind="KeyboardInterrupt")
    except Terminated as exc:  # SIGTERM/SIGHUP while writing: the temporary is gone already
        _fail(exc.message, None, int(exc.code or 1), j, kind="Terminated")
    except OSError as exc:
        line, hint = _os_error_line(exc)
        _fail(line, hint, 2, j, kind=exc.__class__.__name__, path=exc.filename)
    except MemoryError as exc:
        _fail(f"MemoryError: {exc}", "the input needs more memory than this machine has", 2, j, kind="MemoryError")
    except Exception as exc:  # a bug: still one line, but say so
        _fail(
            f"internal error: {exc.__class__.__name__}: {exc}",
            "this is a loratools bug; rerun with LORATOOLS_DEBUG=1 and report the traceback",
            3,
            j,
            kind="InternalError",
        )


def _with_warning_lines(run, json_errors: _JsonErrors | None):  # noqa: ANN001, ANN202
    """Run with every ``LoratoolsWarning`` (a rule a reader took that the file does not state) shown once as one
    ``Warning: ...`` line on stderr as it happens, none with ``-q``; other warnings go where Python sends them."""
    import warnings

    from loratools.errors import LoratoolsWarning

    shown: set[str] = set()
    ctx = json_errors.ctx if json_errors is not None else None

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if not issubclass(category, LoratoolsWarning):
            return default(message, category, filename, lineno, file, line)
        state = ctx.find_root().obj if ctx is not None else None
        if str(message) not in shown and not (isinstance(state, dict) and state.get("quiet")):
            shown.add(str(message))
            click.echo(f"Warning: {message}", err=True)
        return None

    with warnings.catch_warnings():
        default = warnings.showwarning
        warnings.simplefilter("always", LoratoolsWarning)
        warnings.showwarning = show
        return run()


def _closed_stdout() -> None:
    """End quietly with exit 0, as Unix tools do for ``| head``: Python's recipe (docs, "Note on SIGPIPE") points
    stdout at devnull, so the interpreter's last flush of what is still buffered cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # CliRunner's stdout has no file descriptor (io.UnsupportedOperation)
        pass
    raise click.exceptions.Exit(0)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``loratools`` console script."""
    cli.main(args=argv, prog_name="loratools")
