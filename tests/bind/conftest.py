"""Fixtures for tests/bind live in bind_support.py (a unique module name: folders must not share one)."""

from bind_support import *  # noqa: F401,F403
