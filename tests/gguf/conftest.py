"""Fixtures for tests/gguf live in gguf_support.py (a unique module name: folders must not share one)."""

from gguf_support import *  # noqa: F401,F403
