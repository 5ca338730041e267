"""Fixtures for tests/merge live in merge_support.py (a unique module name: folders must not share one)."""

from merge_support import *  # noqa: F401,F403
