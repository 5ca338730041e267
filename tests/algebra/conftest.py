"""Fixtures for tests/algebra live in algebra_support.py (a unique module name: folders must not share one)."""

from algebra_support import *  # noqa: F401,F403
