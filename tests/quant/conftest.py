"""Fixtures for tests/quant live in quant_support.py (a unique module name: folders must not share one)."""

from quant_support import *  # noqa: F401,F403
