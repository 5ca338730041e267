"""Fixtures for tests/mlx live in mlx_support.py (a unique module name: folders must not share one)."""

from mlx_support import *  # noqa: F401,F403
