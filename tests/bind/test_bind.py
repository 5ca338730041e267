"""Will this adapter bind? Text-only adapters on transformers 5 vision-language wrappers, wrapper adapters
on the text model: validate --base counts what binds where, convert --for-base rewrites the prefixes, and
PEFT's own loading is the oracle (no missing or unexpected keys, logits equal to our merged model)."""

from __future__ import annotations

import json

import pytest
from bind_support import (
    FAMILIES,
    build,
    load_peft,
    logits,
    peft_key_check,
    run_cli,
    text_config,
    wrapper_config,
)

TOL = 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_text_adapter_binds_to_the_wrapper_after_convert_for_base(vlm, family, tmp_path) -> None:
    base, text_adapter, _, _ = vlm(family)
    r = run_cli("validate", text_adapter, "--base", base, "--json", code=1)
    report = json.loads(r.output)
    bind = report["binding"]
    assert (bind["bound"], bind["merge_bound"], bind["modules"]) == (0, 8, 8)  # merges by disk names, binds nowhere
    assert bind["rewrites"] == ["model. -> model.language_model."] and bind["bound_after"] == 8
    (err,) = [f for f in report["findings"] if f["code"] == "unbound_modules"]
    assert err["message"].startswith("0 of 8 modules bind to the module tree of ")
    assert "--for-base" in err["hint"]

    # the parity that makes the oracle meaningful: PEFT binds nothing of the original (base output) ...
    reference = logits(build(wrapper_config(family)))
    unbound, missing = load_peft(build(wrapper_config(family)), text_adapter)
    assert missing and float((logits(unbound) - reference).abs().max()) == 0.0
    fixed = tmp_path / "fixed"
    out = run_cli("convert", text_adapter, "--for-base", base, "-o", fixed).output
    assert "rewrote 8 module path(s): model. -> model.language_model." in out
    assert peft_key_check(build(wrapper_config(family)), fixed) == ([], [])
    bound, missing = load_peft(build(wrapper_config(family)), fixed)
    assert missing == []
    theirs = logits(bound)
    assert float((theirs - reference).abs().max()) > 1000 * TOL  # ... and the rewritten adapter moves the logits

    run_cli("merge", base, fixed, "-o", tmp_path / "merged")
    run_cli("merge", base, text_adapter, "-o", tmp_path / "merged-by-disk-names")
    cls = type(build(wrapper_config(family)))
    for merged in ("merged", "merged-by-disk-names"):
        ours = logits(cls.from_pretrained(tmp_path / merged).eval())
        assert float((ours - theirs).abs().max()) <= TOL
    assert json.loads(run_cli("validate", fixed, "--base", base, "--json").output)["binding"]["bound"] == 8


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_wrapper_adapter_binds_to_the_text_model(vlm, family, tmp_path) -> None:
    _, _, wrapper_adapter, text_base = vlm(family)
    report = json.loads(run_cli("validate", wrapper_adapter, "--base", text_base, "--json", code=1).output)
    assert report["binding"]["bound"] == 0 and report["binding"]["rewrites"] == ["model.language_model. -> model."]
    fixed = tmp_path / "fixed"
    # bare names also wrapped the vision tower (Gemma 3's q_proj/v_proj, Qwen2.5-VL's gate_proj/down_proj):
    # the text model has no weight for those, and convert says so rather than dropping them
    r = run_cli("convert", wrapper_adapter, "--for-base", text_base, "-o", fixed, code=2)
    assert "2 of 10 modules do not bind" in r.output and "--exclude" in r.output
    assert ".visual." in r.output or ".vision_tower." in r.output
    run_cli("convert", wrapper_adapter, "--for-base", text_base, "--exclude", r"\.(visual|vision_tower)\.", "-o", fixed)
    assert peft_key_check(build(text_config(family)), fixed) == ([], [])
    bound, _ = load_peft(build(text_config(family)), fixed)
    theirs = logits(bound)
    assert float((theirs - logits(build(text_config(family)))).abs().max()) > 1000 * TOL
    run_cli("merge", text_base, fixed, "-o", tmp_path / "merged")
    ours = logits(type(build(text_config(family))).from_pretrained(tmp_path / "merged").eval())
    assert float((ours - theirs).abs().max()) <= TOL


def test_bare_target_modules_that_wrap_the_vision_tower_are_named(vlm, tmp_path) -> None:
    base, text_adapter, _, _ = vlm("gemma3")
    report = json.loads(run_cli("validate", text_adapter, "--base", base, "--json", code=1).output)
    extra = report["binding"]["extra_targets"]
    assert extra and all(".vision_tower." in m for m in extra)
    (warn,) = [f for f in report["findings"] if f["code"] == "extra_target_modules"]
    assert "vision_tower" in warn["message"] and warn["severity"] == "warning"
    # what PEFT itself does with the original: wraps those modules too, and reports their keys missing
    _, missing = load_peft(build(wrapper_config("gemma3")), text_adapter)
    assert any("vision_tower" in m for m in missing)
    fixed = tmp_path / "fixed"
    run_cli("convert", text_adapter, "--for-base", base, "-o", fixed)
    targets = json.loads((fixed / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) == 8 and all(t.startswith("model.language_model.layers.") for t in targets)
    assert peft_key_check(build(wrapper_config("gemma3")), fixed) == ([], [])
    assert json.loads(run_cli("validate", fixed, "--base", base, "--json").output)["findings"] == []


def test_remap_prefix_is_the_same_rewrite(vlm, tmp_path) -> None:
    from safetensors import safe_open

    base, text_adapter, _, _ = vlm("qwen2_vl")
    run_cli("convert", text_adapter, "--for-base", base, "-o", tmp_path / "auto")
    run_cli("convert", text_adapter, "--remap-prefix", "model.=model.language_model.", "-o", tmp_path / "manual")
    run_cli("convert", text_adapter, "--remap-prefix", "model", code=2)
    keys = []
    for d in ("auto", "manual"):
        with safe_open(str(tmp_path / d / "adapter_model.safetensors"), "pt") as f:
            keys.append({k: f.get_tensor(k) for k in f.keys()})
    assert keys[0].keys() == keys[1].keys()
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys[0])
    assert all(bool((keys[0][k] == keys[1][k]).all()) for k in keys[0])


def test_merge_refusal_says_the_prefix_fix(vlm, tmp_path) -> None:
    _, text_adapter, _, text_base = vlm("llava")
    odd = tmp_path / "llm-prefixed"  # a trainer that wrapped the language model as llm. (InternVL, MiniCPM-V)
    run_cli("convert", text_adapter, "--remap-prefix", "model.=llm.model.", "-o", odd)
    r = run_cli("merge", text_base, odd, "-o", tmp_path / "merged", code=2)
    assert "llm. -> (none)" in r.output and "--for-base" in r.output and "--remap-prefix llm.=" in r.output
    report = json.loads(run_cli("validate", odd, "--base", text_base, "--json", code=1).output)
    assert report["binding"]["rewrites"] == ["llm. -> (none)"]
    fixed = tmp_path / "fixed"
    run_cli("convert", odd, "--for-base", text_base, "-o", fixed)
    run_cli("merge", text_base, fixed, "-o", tmp_path / "merged")
    assert peft_key_check(build(text_config("llava")), fixed) == ([], [])
