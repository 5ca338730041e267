"""Session fixtures for the format tests: a tiny SD pipeline on disk and LoRA files for it."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(HERE))
from models import run_cli  # noqa: E402, F401 - one CLI runner for every test folder

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def pipe():
    import sd

    return sd.build_pipeline()


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("formats")


@pytest.fixture(scope="session")
def sd_dir(pipe, work: Path) -> Path:
    import sd

    return sd.save_pipeline(pipe, work / "sd-tiny")


@pytest.fixture(scope="session")
def sd_dir_text_model(sd_dir: Path, work: Path) -> Path:
    """The same pipeline with the text encoder saved under the Hub's ``text_model.`` key prefix."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = work / "sd-tiny-text-model"
    shutil.copytree(sd_dir, out)
    f = out / "text_encoder" / "model.safetensors"
    tensors = load_file(str(f))
    save_file({f"text_model.{k}": v for k, v in tensors.items()}, str(f), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def kohya_mixed(pipe, work: Path) -> Path:
    """kohya file with per-module ranks (4, 5) and alphas (3, 4, 5): alpha ≠ rank everywhere that matters."""
    import sd

    return sd.save_kohya(sd.kohya_state_dict(pipe), work / "mixed.safetensors")


@pytest.fixture(scope="session")
def kohya_uniform(pipe, work: Path) -> Path:
    """kohya file with ranks 4/5 and one alpha (3.0): what diffusers' loader reproduces exactly."""
    import sd

    return sd.save_kohya(sd.kohya_state_dict(pipe, uniform_alpha=True), work / "uniform.safetensors")


@pytest.fixture(scope="session")
def diffusers_lora(pipe, work: Path) -> Path:
    import sd

    return sd.save_diffusers_lora(pipe, work / "diffusers-lora")


def fused_weights(pipe, lora: Path, **kwargs) -> dict:
    """Pipeline weights after diffusers' own ``load_lora_weights`` + ``fuse_lora`` (component-prefixed)."""
    p = copy.deepcopy(pipe)
    p.load_lora_weights(str(lora), **kwargs)
    p.fuse_lora()
    p.unload_lora_weights()
    return component_weights(p)


def component_weights(p) -> dict:
    out = {f"unet.{k}": v.detach().clone() for k, v in p.unet.state_dict().items()}
    out.update({f"text_encoder.{k}": v.detach().clone() for k, v in p.text_encoder.state_dict().items()})
    return out
