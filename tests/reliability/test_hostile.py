"""Every generated hostile input (tests/reliability/hostile_*.py) through every command its case lists."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import HostileCase, all_cases
from reliability_support import invoke

CASES = all_cases()
RUNS = [(case, command) for case in CASES for command in sorted(case.commands)]


def _run(case: HostileCase, command: str, tmp_path: Path) -> None:
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out_dir.mkdir()
    path = case.build(inputs)
    before = sorted(p.relative_to(inputs) for p in inputs.rglob("*"))
    out = out_dir / "result"
    args = [path if a in ("A", "B") else out if a == "O" else a for a in case.commands[command]]
    code, stdout, stderr = invoke(*args)
    text = stdout + stderr
    assert "Traceback" not in text and "internal error" not in text.lower(), text
    named = ""  # where the input file is named besides the line itself: validate's report header
    if command.startswith("validate") and case.validate_exit == 1:
        assert code == 1, text
        line = next((ln for ln in stdout.splitlines() if ln.lstrip().startswith("error")), "")  # the finding
        named = stdout.splitlines()[0] if stdout else ""
    else:
        assert code == 2, text
        errors = [ln for ln in stderr.splitlines() if ln.startswith("Error: ")]
        assert len(errors) == 1, stderr
        line = errors[0]
    for want in case.expect:
        assert want in line, (want, line)
    if case.name_in_error:
        assert path.name in line or path.name in named, (path.name, line)
    assert list(out_dir.iterdir()) == [], sorted(p.name for p in out_dir.iterdir())
    assert sorted(p.relative_to(inputs) for p in inputs.rglob("*")) == before  # nothing written beside the input


@pytest.mark.parametrize("case, command", RUNS, ids=[f"{c.name}-{cmd}" for c, cmd in RUNS])
def test_hostile_input(case: HostileCase, command: str, tmp_path: Path) -> None:
    _run(case, command, tmp_path)


def test_every_area_has_cases() -> None:
    """Every area module exists and contributes cases (a generator that yields nothing tests nothing)."""
    import importlib

    from hostile import AREAS

    for area in AREAS:
        assert importlib.import_module(area).CASES, area
