"""Serving compatibility rules on small adapters (PEFT's own fixtures) and through validate --target."""

from __future__ import annotations

import json

import pytest
import torch
from formats_support import FIXTURES, run_cli

from loratools.errors import UsageError
from loratools.formats.adapter_io import load_adapter
from loratools.model.adapter import Adapter, LoraModule
from loratools.ops.validate.serving import serving_findings, serving_rules, serving_targets

PEFT = FIXTURES / "peft"


def codes(adapter, target, **settings) -> set[str]:
    return {f.code for f in serving_findings(adapter, target, **settings) if f.severity == "error"}


def test_every_rule_names_version_and_source():
    rules = serving_rules()
    assert set(serving_targets()) == {"vllm", "sglang", "llama.cpp", "ollama", "onnxruntime-genai"}
    for name, r in rules.items():
        assert r["version"] and r["sources"] and all(s.startswith("https://") for s in r["sources"]), name
        for rule in r["rules"]:
            assert {"id", "when", "severity", "message"} <= set(rule), (name, rule)


def test_plain_lora_is_fine_everywhere():
    adapter = load_adapter(PEFT / "llama-lora")
    for target in serving_targets():
        assert codes(adapter, target) == set(), target


@pytest.mark.parametrize(
    ("fixture", "target", "code"),
    [
        ("llama-dora", "vllm", "vllm.dora"),
        ("llama-dora", "llama.cpp", "llama.cpp.dora"),
        ("llama-dora", "sglang", "sglang.dora"),
        ("llama-dora", "onnxruntime-genai", "onnxruntime-genai.dora"),
        ("llama-mts", "vllm", "vllm.modules_to_save"),
        ("gpt2-lora", "ollama", "ollama.importer_arch"),
        ("llama-bias", "vllm", "vllm.bias"),
        ("llama-bias", "llama.cpp", "llama.cpp.bias"),
        ("llama-rslora", "ollama", "ollama.rslora"),
        ("llama-rslora", "sglang", "sglang.rslora"),
        ("llama-patterns", "ollama", "ollama.single_alpha"),
        ("llama-embed", "onnxruntime-genai", "onnxruntime-genai.embedding"),
    ],
)
def test_runtime_rejects(fixture, target, code):
    adapter = load_adapter(PEFT / fixture)
    found = codes(adapter, target)
    assert code in found, (fixture, target, found)


def test_rslora_is_fine_for_vllm_and_patterns_warn():
    assert codes(load_adapter(PEFT / "llama-rslora"), "vllm") == set()
    warnings = {f.code for f in serving_findings(load_adapter(PEFT / "llama-patterns"), "vllm")}
    assert "vllm.per_module_scale" in warnings


def _big_rank(rank: int) -> Adapter:
    g = torch.Generator().manual_seed(0)
    mod = LoraModule(down=torch.randn(rank, 64, generator=g), up=torch.randn(64, rank, generator=g), alpha=rank)
    return Adapter(modules={"model.layers.0.self_attn.q_proj": mod}, meta={"format": "peft"})


def test_rank_against_max_lora_rank():
    adapter = _big_rank(32)
    findings = serving_findings(adapter, "vllm")
    rank = [f for f in findings if f.code == "vllm.rank"]
    assert rank and "rank 32 > max_lora_rank 16" in rank[0].message and rank[0].module
    assert codes(adapter, "vllm", max_lora_rank=32) == set()
    assert codes(adapter, "sglang") == set()  # no limit unless the server was started with one
    assert "sglang.rank" in codes(adapter, "sglang", max_lora_rank=16)
    with pytest.raises(UsageError, match="not a value"):
        serving_findings(adapter, "vllm", max_lora_rank=24)


def test_diffusion_lora_gets_one_finding(kohya_mixed):
    findings = serving_findings(load_adapter(kohya_mixed), "vllm")
    assert [f.code for f in findings] == ["vllm.not_llm"]


def test_gpt2_family_adapters_are_language_model_adapters():
    """GPT-2 (and Falcon, Bloom, ChatGLM) name their blocks transformer.*: not a pipeline (issue 14 item 7)."""
    adapter = load_adapter(PEFT / "gpt2-lora")
    assert all(n.startswith("transformer.") for n in adapter.modules)
    for target in serving_targets():
        assert f"{target}.not_llm" not in {f.code for f in serving_findings(adapter, target)}
    # the real findings are no longer hidden behind the false one
    assert serving_findings(adapter, "vllm") == serving_findings(adapter, "vllm", base_kind="folder")
    assert [f.code for f in serving_findings(adapter, "vllm", base_kind="pipeline")] == ["vllm.not_llm"]


def test_unknown_target():
    with pytest.raises(UsageError, match="known: llama.cpp"):
        serving_findings(_big_rank(4), "tgi")


def test_validate_target_cli():
    code, out, err = run_cli(["validate", str(PEFT / "llama-dora"), "--target", "vllm", "--json"])
    data = json.loads(out)
    assert code == 1, err
    assert any(f["code"] == "vllm.dora" and "vllm-project/vllm" in f["message"] for f in data["findings"])
    code, out, _ = run_cli(["validate", str(PEFT / "llama-lora"), "--target", "llama.cpp"])
    assert code == 0
