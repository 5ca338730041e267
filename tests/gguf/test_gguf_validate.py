"""validate --target llama.cpp / ollama: the loader's rules, Ollama's importer, and with --base the GGUF
file planned exactly as convert --to gguf would write it."""

from __future__ import annotations

import json

from gguf_support import FIXTURES, GGUF, run_cli

from loratools import load_adapter
from loratools.ops.validate.serving import serving_findings

PEFT = FIXTURES / "peft"


def found(adapter, target, **kw) -> dict[str, str]:
    return {f.code: f.severity for f in serving_findings(adapter, target, **kw)}


def test_rslora_and_patterns_are_warnings_for_llama_cpp_and_errors_for_ollamas_importer():
    rs, pat = load_adapter(PEFT / "llama-rslora"), load_adapter(PEFT / "llama-patterns")
    assert found(rs, "llama.cpp") == {"llama.cpp.rslora": "warning"}
    assert found(pat, "llama.cpp")["llama.cpp.single_alpha"] == "warning"
    assert found(rs, "ollama")["ollama.rslora"] == "error"
    assert found(pat, "ollama")["ollama.single_alpha"] == "error"
    assert found(rs, "ollama")["ollama.prebuilt"] == "warning"


def test_ollama_importer_architectures_and_integer_alpha():
    gpt2 = load_adapter(PEFT / "gpt2-lora")
    assert found(gpt2, "ollama")["ollama.importer_arch"] == "error"
    llama = load_adapter(PEFT / "llama-lora")
    assert "ollama.importer_arch" not in found(llama, "ollama")
    for m in llama.modules.values():
        m.alpha = 7.5
    assert found(llama, "ollama")["ollama.integer_alpha"] == "error"


def test_a_gguf_adapter_needs_no_importer(work):
    from loratools.formats.registry import get_format

    out = work / "v.gguf"
    get_format("gguf").write(load_adapter(PEFT / "llama-patterns"), out, base=GGUF / "llama-f32.gguf")
    assert found(load_adapter(out), "ollama") == {}
    assert found(load_adapter(out), "llama.cpp") == {}


def test_with_a_gguf_base_the_loader_rules_are_checked():
    embed = load_adapter(PEFT / "llama-embed")
    assert found(embed, "llama.cpp", base=GGUF / "llama-q8_0.gguf") == {}  # base_layer equals the base
    assert found(load_adapter(PEFT / "gpt2-lora"), "llama.cpp", base=GGUF / "llama-f32.gguf")  # wrong base
    code, out, err = run_cli(
        ["validate", str(PEFT / "llama-dora"), "--target", "llama.cpp", "--base", str(GGUF / "llama-f32.gguf"),
         "--json"]
    )  # fmt: skip
    assert code == 1, err
    codes = {f["code"] for f in json.loads(out)["findings"]}
    assert {"llama.cpp.dora"} <= codes
    code, out, err = run_cli(["validate", str(PEFT / "llama-rslora"), "--target", "ollama", "--base",
                              str(FIXTURES / "bases" / "llama")])  # fmt: skip
    assert code == 1 and "ollama.rslora" in out + err
