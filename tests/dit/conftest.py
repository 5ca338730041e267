"""Helpers for tests/dit live in dit_support.py (a unique module name: folders must not share one); the Flux
``model``/``pipeline`` fixtures four test modules share are here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from dit_support import save_pipeline, transformer  # noqa: E402


@pytest.fixture(scope="module")
def model():
    """The tiny random Flux transformer (a test module of another family defines its own ``model``)."""
    return transformer()


@pytest.fixture(scope="module")
def pipeline(model, tmp_path_factory):
    """``model`` saved as a pipeline folder (model_index.json + transformer/)."""
    return save_pipeline(model, tmp_path_factory.mktemp("pipeline") / "pipe")
