"""Session fixtures for the adapter-family tests: the committed PEFT/LyCORIS fixtures and their oracles."""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
FIXTURES = ROOT / "fixtures"
FAMILIES = FIXTURES / "families"
LLAMA = FIXTURES / "bases" / "llama"
UNET = FAMILIES / "tiny-unet"
__all__ = [
    "FAMILIES",
    "LLAMA",
    "LYCORIS_FIXTURES",
    "PEFT_FIXTURES",
    "ROOT",
    "UNET",
    "llama",
    "llama_state",
    "lycoris_model",
    "peft_merged",
    "unet_input",
]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(FIXTURES))
warnings.filterwarnings("ignore")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

PEFT_FIXTURES = sorted(p.name for p in FAMILIES.glob("peft-*"))
LYCORIS_FIXTURES = sorted(p.name for p in FAMILIES.glob("lycoris-*.safetensors"))


@pytest.fixture(scope="session")
def llama():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(LLAMA), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def llama_state(llama):
    return {k: v.clone() for k, v in llama.state_dict().items()}


@pytest.fixture(scope="session")
def peft_merged(llama):
    """fixture name -> (merge_and_unload state dict, unmerged PeftModel logits) from PEFT itself."""
    from models import outputs, sample_inputs
    from peft import PeftModel

    out = {}
    for name in PEFT_FIXTURES:
        pm = PeftModel.from_pretrained(copy.deepcopy(llama), str(FAMILIES / name)).eval()
        logits = outputs(pm, sample_inputs())
        out[name] = ({k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}, logits)
    return out


def lycoris_model(fname: str):
    """The tiny UNet with the LyCORIS network that wrote ``fname`` rebuilt by lycoris-lora and its weights loaded."""
    import make_family_fixtures as mf
    from lycoris import create_lycoris
    from lycoris_family_models import tiny_unet

    model = tiny_unet()
    kw = dict(mf.LYCORIS_SPECS[fname])
    algo = kw.pop("algo")
    net = create_lycoris(model, 1.0, algo=algo, **kw)
    net.apply_to()
    net.load_weights(str(FAMILIES / fname))
    net.eval()
    return model


def unet_input() -> torch.Tensor:
    return torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0))
