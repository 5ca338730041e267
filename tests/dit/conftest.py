"""Fixtures for tests/dit live in dit_support.py (a unique module name: folders must not share one)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
