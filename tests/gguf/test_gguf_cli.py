"""The GGUF path as a new user takes it: convert --to gguf (with --ollama), back to PEFT, info/validate/
diff/resize on the GGUF file, each one command."""

from __future__ import annotations

import json

from gguf_support import FIXTURES, GGUF, run_cli

from loratools import load_adapter

PEFT = FIXTURES / "peft"


def test_convert_to_gguf_and_back(work):
    out = work / "cli" / "adapter.gguf"
    code, stdout, err = run_cli(
        ["convert", str(PEFT / "llama-rslora"), "--to", "gguf", "--base", str(GGUF / "llama-q8_0.gguf"),
         "-o", str(out), "--ollama", "--json"]
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    assert result["format"] == "gguf" and result["modules"] == 8
    modelfile = (work / "cli" / "Modelfile").read_text()
    assert modelfile.splitlines()[1] == "ADAPTER ./adapter.gguf"
    assert modelfile.startswith("FROM ") and modelfile.split()[1].endswith("llama-q8_0.gguf")

    back = work / "cli" / "back"
    assert run_cli(["convert", str(out), "--to", "peft", "-o", str(back)])[0] == 0
    a, b = load_adapter(PEFT / "llama-rslora"), load_adapter(back)
    for name, m in a.modules.items():
        d = m.delta()
        assert float((d - b.modules[name].delta()).abs().max() / d.abs().max()) <= 1e-6

    code, stdout, _ = run_cli(["info", str(out), "--json"])
    assert code == 0 and json.loads(stdout)["format"] == "gguf"
    assert run_cli(["validate", str(out)])[0] == 0
    code, stdout, _ = run_cli(["diff", str(PEFT / "llama-rslora"), str(out), "--json"])
    assert code == 0, stdout
    small = work / "cli" / "small.gguf"
    code, _, err = run_cli(["resize", str(out), "--rank", "2", "-o", str(small)])
    assert code == 0, err
    assert load_adapter(small).ranks() == {2}


def test_convert_refusal_is_one_line_with_the_way_out(work):
    code, _, err = run_cli(
        ["convert", str(PEFT / "llama-dora"), "--to", "gguf", "--base", str(FIXTURES / "bases" / "llama"),
         "-o", str(work / "dora.gguf")]
    )  # fmt: skip
    assert code != 0 and "DoRA" in err and "loratools merge" in err
    assert not (work / "dora.gguf").exists()
    code, _, err = run_cli(["convert", str(PEFT / "llama-lora"), "--to", "peft", "--ollama", "-o", str(work / "x")])
    assert code != 0 and "--to gguf" in err


def test_gguf_model_given_as_adapter_says_so():
    code, _, err = run_cli(["info", str(GGUF / "llama-f32.gguf")])
    assert code != 0 and "GGUF model" in err


def test_dora_lowered_with_as_lora_lands_exactly(work):
    """DoRA is refused as such; --as-lora --base (the HF folder) lowers it first, and the GGUF's runtime ΔW
    then equals PEFT's own merge (merge_and_unload − base) after the converter's Q/K permutation."""
    import gguf
    from gguf_support import llama_permute, runtime_deltas
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = work / "cli" / "dora.gguf"
    base = FIXTURES / "bases" / "llama"
    code, _, err = run_cli(["convert", str(PEFT / "llama-dora"), "--to", "gguf", "--as-lora", "--base", str(base),
                            "-o", str(out)])  # fmt: skip
    assert code == 0, err
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), PEFT / "llama-dora")
    after = merged.merge_and_unload().state_dict()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    got = runtime_deltas(out)
    for key, w in after.items():
        d = (w - before[key]).double()
        if float(d.abs().max()) == 0:
            continue
        d = llama_permute(d, 4, 4) if key.endswith("q_proj.weight") else d
        name = tmap.get_name(key, try_suffixes=(".weight",))
        assert float((got[name] - d).abs().max() / d.abs().max()) < 1e-5, name


def test_info_with_a_gguf_base():
    """info --base model.gguf counts the GGUF model's parameters (it said 'not a checkpoint')."""
    code, stdout, err = run_cli(["info", str(PEFT / "llama-lora"), "--base", str(GGUF / "llama-q8_0.gguf"), "--json"])
    assert code == 0, err
    data = json.loads(stdout)
    base = str(FIXTURES / "bases" / "llama")
    hf = json.loads(run_cli(["info", str(PEFT / "llama-lora"), "--base", base, "--json"])[1])
    assert data["base_parameters"] == hf["base_parameters"] == 21664
    assert data["parameter_share"] == hf["parameter_share"]
