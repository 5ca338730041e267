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

#: folders whose tests are long (model exports, subprocesses): scheduled first, so that under
#: ``pytest -n 2`` the quick tests fill in around them instead of one worker finishing them alone
#: while the other idles (the last 12% of a busy run took 3 of its 7 minutes that way)
SLOW_FIRST = ("tests/onnx/", "tests/families/", "tests/reliability/")


def pytest_collection_modifyitems(items: list) -> None:  # noqa: D103
    def rank(item) -> int:  # noqa: ANN001
        path = item.nodeid
        return next((i for i, prefix in enumerate(SLOW_FIRST) if path.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the order within a folder is kept
