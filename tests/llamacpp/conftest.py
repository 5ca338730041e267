"""Fixtures for tests/llamacpp live in llamacpp_support.py (a unique module name: folders must not share one)."""

from llamacpp_support import *  # noqa: F401,F403
