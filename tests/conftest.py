"""Settings for the whole suite.

Hypothesis runs under the ``loratools`` profile: no deadline and no timing health check, because a
busy machine (CI shares its cores) makes any example slow now and then, and a slow example is not a
failing one (issue 14.1: DeadlineExceeded failed the README's test command under load). Select
another registered profile with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "loratools",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "loratools"))
