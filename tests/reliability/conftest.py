"""Fixtures for the reliability tests: the broken-input corpus, good inputs to pair it with, tiny cases."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reliability_support import BROKEN, FIXTURES  # noqa: E402


@pytest.fixture(scope="session")
def expected() -> dict[str, dict]:
    """EXPECTED.json of fixtures/broken: entry -> kind, class, message, validate_exit (and ``only``)."""
    return json.loads((BROKEN / "EXPECTED.json").read_text())


@pytest.fixture
def adapter_copy(tmp_path: Path) -> Path:
    """A private copy of the llama-lora fixture (tests may damage it)."""
    dst = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft" / "llama-lora", dst)
    return dst


@pytest.fixture
def base_copy(tmp_path: Path) -> Path:
    """A private copy of the tiny llama base."""
    dst = tmp_path / "base"
    shutil.copytree(FIXTURES / "bases" / "llama", dst)
    return dst
