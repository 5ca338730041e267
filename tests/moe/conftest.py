"""Fixtures for tests/moe live in moe_support.py (a unique module name: folders must not share one)."""

from moe_support import *  # noqa: F401,F403
