"""Fixtures for the foundation tests: committed tiny bases/adapters and the oracles that load them."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(TESTS))

#: fixture adapter -> base kind (the base folder under fixtures/bases)
ADAPTERS = {
    "llama-lora": "llama",
    "llama-rslora": "llama",
    "llama-patterns": "llama",
    "llama-dora": "llama",
    "llama-embed": "llama",
    "llama-mts": "llama",
    "llama-bias": "llama",
    "llama-bf16": "llama",
    "llama-bin": "llama",
    "gpt2-lora": "gpt2",
    "bert-lora": "bert",
}


def adapter_dir(name: str) -> Path:
    return FIXTURES / "peft" / name


def base_dir(kind: str) -> Path:
    return FIXTURES / "bases" / kind


def load_base(kind: str):
    """A fresh transformers model from the committed base folder."""
    from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

    cls = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "bert": BertModel}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(str(base_dir(kind))).eval()


def load_peft(adapter: str | Path, kind: str):
    """PEFT's own loading of an adapter folder onto a fresh base: the oracle."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load_base(kind), str(adapter)).eval()


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    return FIXTURES
