"""Fixtures for tests/foundation live in foundation_support.py (a unique module name: folders must not share one)."""

from foundation_support import *  # noqa: F401,F403
