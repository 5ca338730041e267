"""The README's set-up command and tour run as written, in that order, and print what the README shows.

Every ``$ loratools ...`` line of the README writes under ``out/`` (ignored by .gitignore). The test runs
the set-up's ``loratools`` command and then the tour's lines in order (the ONNX ones excepted: exports
take minutes and tests/onnx runs them) in a temporary copy of the fixtures, so a user's own ``out/`` in
the checkout is never read, written or removed, and compares each command's first output line with the
README's, timings and sizes masked. Before and after, ``git status --porcelain`` and the checkout's
``out/`` must be as they were.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from foundation_support import ROOT

from loratools.cli.main import cli

README = ROOT / "README.md"
#: numbers that change from run to run: durations, sizes, speed-ups
_VOLATILE = re.compile(r"\d+(\.\d+)? (s|ms|KB|MB|B)\b|\d+(\.\d+)?x faster")
SKIP = ("export-onnx", "bench", "onnx")


def tour() -> list[tuple[list[str], list[str]]]:
    """(argv after 'loratools', the README's output lines) for each ``$ loratools`` line in a code block."""
    steps: list[tuple[list[str], list[str]]] = []
    in_block = False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if line.startswith("$ loratools "):
            steps.append((shlex.split(line.removeprefix("$ loratools ")), []))
        elif steps and not line.startswith("$ "):
            steps[-1][1].append(line)
    return steps


def _outputs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-o", "--output")]


def setup_commands() -> list[list[str]]:
    """argv after 'loratools' of each ``&& loratools ...`` in the README's set-up commands."""
    text = README.read_text(encoding="utf-8")
    return [shlex.split(c) for c in re.findall(r"&& loratools ([a-z-]+ [^\n`]*)", text)]


def test_every_readme_output_is_under_out() -> None:
    setup = setup_commands()
    assert setup and setup[0][0] == "merge"
    outputs = [o for argv in [*setup, *(argv for argv, _ in tour())] for o in _outputs(argv)]
    assert len(outputs) >= 12
    assert all(o.startswith("out/") for o in outputs), [o for o in outputs if not o.startswith("out/")]
    assert "/out/" in (ROOT / ".gitignore").read_text().splitlines()


def _status() -> set[str]:
    r = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return set(r.stdout.splitlines())


def _mask(line: str) -> str:
    return _VOLATILE.sub("#", line).rstrip()


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (empty when there is no folder)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _run(argv: list[str], shown: list[str]) -> None:
    r = CliRunner().invoke(cli, argv)
    expected_code = 1 if argv[0] == "verify" and "FAILED" in "\n".join(shown) else 0
    if argv[0] == "validate" and "error(s)" in "\n".join(shown):
        expected_code = 1
    assert r.exit_code == expected_code, (argv, r.output)
    if shown:
        got = [_mask(x) for x in r.stdout.splitlines()]
        assert _mask(shown[0]) in got, f"loratools {' '.join(argv)}: README shows {shown[0]!r}, got:\n{r.stdout}"


def test_the_setup_then_the_tour_run_as_written_in_a_copy(tmp_path, monkeypatch) -> None:
    """Set-up, then the tour, as a user runs them: each tour output is new or one the tour may overwrite."""
    steps = [(argv, shown) for argv, shown in tour() if not any(w in " ".join(argv) for w in SKIP)]
    assert len(steps) >= 12
    work = tmp_path / "checkout"
    shutil.copytree(ROOT / "fixtures", work / "fixtures")
    monkeypatch.chdir(work)
    before, out_before = _status(), _tree(ROOT / "out")
    for argv in setup_commands():
        _run(argv, [])
    assert (work / "out" / "merged").is_dir()  # the set-up's output, which the tour's merge then writes again
    for argv, shown in steps:
        _run(argv, shown)
    assert _status() == before
    assert _tree(ROOT / "out") == out_before, "the tour touched the checkout's out/"


def _doc_command_lines() -> list[tuple[str, str]]:
    """(file, command line) for every ``loratools CMD ...`` line in a code block of README.md and docs/*.md."""
    found = []
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        in_block = False
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                in_block = not in_block
                continue
            text = line.strip().removeprefix("$ ")
            if in_block and text.startswith("loratools "):
                found.append((path.name, text.split("  #")[0].rstrip(" \\")))
    return found


def test_every_documented_command_line_names_real_options() -> None:
    """Each command line in the docs' code blocks names a real command and only options it has."""
    import click

    from loratools.cli.main import COMMANDS

    lines = _doc_command_lines()
    assert len(lines) >= 30
    ctx = click.Context(cli, info_name="loratools")
    for where, text in lines:
        words = shlex.split(text.replace("[", " ").replace("]", " ").replace("|", " "))[1:]
        while words and words[0].startswith("-"):  # -q / --progress before the command
            words = words[1:]
        if not words or words[0] not in COMMANDS:
            raise AssertionError(f"{where}: `{text}` names no loratools command")
        command = cli.get_command(ctx, words[0])
        have = {o for p in command.params for o in getattr(p, "opts", ())} | {"--help", "-h"}
        used = {w.split("=")[0] for w in words[1:] if w.startswith("-") and not _is_number(w)}
        assert used <= have, f"{where}: `loratools {words[0]}` has no {sorted(used - have)}: {text}"


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True
