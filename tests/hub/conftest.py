"""Fixtures for tests/hub live in hub_support.py (a unique module name: folders must not share one)."""

from hub_support import *  # noqa: F401,F403
