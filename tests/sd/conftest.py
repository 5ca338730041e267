"""Fixtures for tests/sd: tiny SD1.5/SDXL models as original (LDM) single files and pipelines, kohya LoRAs."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "formats"))  # sd.py: a diffusers-format LoRA writer
warnings.filterwarnings("ignore", category=FutureWarning)

import ldm_support  # noqa: E402


def _case(name: str, build, work: Path, linear_as_conv: tuple[str, ...] = (), pipeline: bool = True) -> dict:
    from safetensors.torch import save_file

    parts = build()
    folder = work / name
    folder.mkdir()
    lora = ldm_support.kohya_lora(parts, linear_as_conv=linear_as_conv)
    lora_path = folder / "lora.safetensors"
    save_file(lora, str(lora_path), metadata={"ss_network_module": "networks.lora"})
    return {
        "parts": parts,
        "ldm": ldm_support.save_ldm(parts, folder / f"{name}.safetensors"),
        "pipeline": ldm_support.save_pipeline(parts, folder / "pipeline") if pipeline else None,
        "lora": lora,
        "lora_path": lora_path,
    }


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _case("sd15", ldm_support.build_sd15, tmp_path_factory.mktemp("ldm"))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _case("sd2", ldm_support.build_sd2, tmp_path_factory.mktemp("ldm"), pipeline=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # one linear proj_in gets 1×1-conv factors, as sd-scripts writes them for SD2's linear projections
    as_conv = ("down_blocks.1.attentions.0.proj_in",)
    return _case("sdxl", ldm_support.build_sdxl, tmp_path_factory.mktemp("ldm"), as_conv)
