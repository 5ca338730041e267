"""Settings for the whole suite.

One compute thread per test process: under ``pytest -n 2`` the two workers already fill two cores,
tiny models gain nothing from intra-op threads, and oversubscribed threads made a busy machine's run
about 1.5x slower (tests/algebra + tests/merge/test_parity: 178 s -> 114 s at load average 12).
OMP_NUM_THREADS also reaches the ``python -m loratools`` subprocesses; set it to use more.

Hypothesis runs under the ``loratools`` profile: no deadline and no timing health check, because a
busy machine (CI shares its cores) makes any example slow now and then, and a slow example is not a
failing one (issue 14.1: DeadlineExceeded failed the README's test command under load). Select
another registered profile with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
with contextlib.suppress(RuntimeError):  # only allowed before any inter-op work started
    torch.set_num_interop_threads(1)

settings.register_profile(
    "loratools",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "loratools"))
