"""``validate --base MOE.gguf --target llama.cpp|ollama`` (issue 20 item 2): a MoE adapter's expert slices are one
line per tensor family (``model.layers.*.mlp.experts.down_proj[*]``, "+N more"), not one per expert and layer.
Needs no runtime: the Qwen3-MoE fixture (4 experts, 2 layers) written as a GGUF base by tests/moe_gguf.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from llamacpp_support import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_gguf import QWEN3_MOE_LORA, write_moe_gguf  # noqa: E402


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory) -> Path:
    return write_moe_gguf(tmp_path_factory.mktemp("moe") / "base.gguf")


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("error")]


def test_llama_cpp_names_the_experts_once(moe_base):
    code, text, _ = run_cli(["validate", QWEN3_MOE_LORA, "--base", moe_base, "--target", "llama.cpp"])
    errors = _errors(text)
    assert code == 1 and len(errors) == 1 and "llama.cpp.experts" in errors[0] and "more)" in errors[0], text


def test_ollama_one_line_per_expert_family(moe_base):
    code, text, _ = run_cli(["validate", QWEN3_MOE_LORA, "--base", moe_base, "--target", "ollama"])
    experts = [line for line in _errors(text) if "ollama.expert:" in line]
    assert code == 1 and len(experts) == 2, text  # gate_up_proj and down_proj, 8 slices each (2 layers x 4)
    assert all("(+7 more of model.layers.*.mlp.experts." in line and "[*])" in line for line in experts), text
