"""Fixtures for tests/onnx live in onnx_support.py (a unique module name: folders must not share one)."""

from onnx_support import *  # noqa: F401,F403
