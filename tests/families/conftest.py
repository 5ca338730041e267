"""Fixtures for tests/families live in families_support.py (a unique module name: folders must not share one)."""

from families_support import *  # noqa: F401,F403
