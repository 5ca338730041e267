"""No test depends on wall time (issue 14.1): the suite failed with DeadlineExceeded on a busy machine.

Hypothesis runs under the ``loratools`` profile of tests/conftest.py (no deadline, no timing health
check), and no test file sets a deadline or a timeout short enough for a loaded machine to miss it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parents[1]
#: the shortest wall-clock bound a test may set (seconds): a hang detector, never a speed check
MIN_BOUND_S = 300


def test_the_hypothesis_profile_has_no_deadline() -> None:
    assert settings().deadline is None
    assert HealthCheck.too_slow in settings().suppress_health_check


@settings(max_examples=2, database=None)
@given(st.integers())
def test_a_slow_example_is_not_a_failure(n: int) -> None:
    """Slower than hypothesis' default 200 ms deadline, as any example can be on a loaded machine."""
    time.sleep(0.25)


def test_the_fuzz_settings_have_no_deadline() -> None:
    import test_fuzz

    assert test_fuzz.FUZZ.deadline is None


_BOUNDS = [
    re.compile(r"\bdeadline=(?!None)"),  # a settings(deadline=...) other than None
    re.compile(r"timeout(?:_s)?\s*=\s*(\d+(?:\.\d+)?)"),  # subprocess / wait timeouts
    re.compile(r"(?:time|monotonic)\(\)\s*\+\s*(\d+(?:\.\d+)?)"),  # polling bounds
    re.compile(r"(?:time_limit|only_loratools_errors)\([^)]*?(\d+(?:\.\d+)?)\s*\)"),  # fuzz hang timers
    re.compile(r"(?:seconds|_ms)\"\]\s*[<>](?!=)\s*\w+\[\"\w*(?:seconds|_ms)\"\]"),  # one timing must beat another
]


def test_no_test_sets_a_short_wall_time_bound() -> None:
    short = []
    for path in sorted(TESTS.rglob("*.py")):
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for pat in _BOUNDS:
                for m in pat.finditer(code):
                    value = m.group(1) if m.groups() else None
                    if value is None or float(value) < MIN_BOUND_S:
                        short.append(f"{path.relative_to(TESTS)}:{n}: {line.strip()}")
    assert short == [], "wall-time bounds below {} s:\n{}".format(MIN_BOUND_S, "\n".join(short))
