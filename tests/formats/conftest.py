"""Fixtures for tests/formats live in formats_support.py (a unique module name: folders must not share one)."""

from formats_support import *  # noqa: F401,F403
