"""Write docs/cli.md from the ``--help`` of the ``loratools`` group and every registered command.

    python tools/gen_cli_docs.py           # rewrite docs/cli.md
    python tools/gen_cli_docs.py --check   # exit 1 when docs/cli.md is stale

Help is rendered at a fixed width (100 columns) so the file does not depend on the terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"
WIDTH = 100

EXIT_CODES = """\
| code | meaning |
|---|---|
| 0 | success |
| 1 | the command ran and found problems: validate findings, a failed verification |
| 2 | unusable input or a usage error: missing or damaged files, unsupported formats, bad options |
| 3 | internal error: a loratools bug (rerun with `LORATOOLS_DEBUG=1` and report the traceback) |
"""


def _fixed_width() -> None:
    os.environ["COLUMNS"] = str(WIDTH)
    os.environ.pop("LINES", None)


def _help(command, name: str, parent=None) -> str:  # noqa: ANN001
    import click

    # no terminal_width: click then wraps at COLUMNS - 2, exactly as `COLUMNS=100 loratools CMD --help` does
    settings = {**command.context_settings, "max_content_width": WIDTH}
    ctx = click.Context(command, info_name=name, parent=parent, **settings)
    return command.get_help(ctx).rstrip()


def _root(cli):  # noqa: ANN001, ANN202
    import click

    return click.Context(cli, info_name="loratools", **{**cli.context_settings, "max_content_width": WIDTH})


def commands() -> list[tuple[str, object]]:
    """(name, click command) for every registered command whose module exists."""

    from loratools.cli.main import COMMANDS, cli

    root = _root(cli)
    found = []
    for name in sorted(COMMANDS):
        try:
            cmd = cli.get_command(root, name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("loratools.cli."):
                print(f"note: command {name!r} is registered but {exc.name} does not exist yet", file=sys.stderr)
                continue
            raise
        found.append((name, cmd))
    return found


def generate() -> str:
    """The full text of docs/cli.md."""
    _fixed_width()

    from loratools.cli.main import cli

    root = _root(cli)
    parts = [
        "# Command-line reference",
        "",
        "Generated from `--help` by `python tools/gen_cli_docs.py`; do not edit by hand (a test checks it).",
        "",
        "## Exit codes",
        "",
        "Every command uses the same exit codes:",
        "",
        EXIT_CODES,
        "Errors print one line, `Error: ...`, naming the file and tensor, and often a `Hint: ...` line;",
        "set `LORATOOLS_DEBUG=1` to see the traceback.",
        "",
        "## loratools",
        "",
        "```text",
        _help(cli, "loratools"),
        "```",
        "",
    ]
    for name, cmd in commands():
        parts += [f"## loratools {name}", "", "```text", _help(cmd, name, parent=root), "```", ""]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description="Generate docs/cli.md from --help.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs from the generated text")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    text = generate()
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
        if current != text:
            print(f"{DOC.relative_to(ROOT)} is stale; run: python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        print(f"{DOC.relative_to(ROOT)} is current")
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
