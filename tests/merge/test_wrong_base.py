"""An adapter merged, validated or combined against a model it says it was not trained on (issue 19, 2.3).

Tiny Qwen2 and Llama models of the same shapes: every Qwen2 adapter module has a Llama weight of the
right shape, so only what the adapter records (PEFT's ``base_model_name_or_path`` and ``auto_mapping``)
can tell. One rule (``loratools.ops.base_match``) for merge, validate --base and combine; the legitimate
cases around it (a hub id cached offline, a quantized copy, a merged output of ours, a fine-tune, no
recorded base) must keep working.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import models
import pytest
import torch

SHAPES = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=models.VOCAB,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _qwen2(layers: int = 2) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    return Qwen2ForCausalLM(Qwen2Config(**{**SHAPES, "num_hidden_layers": layers})).eval()


def _trained_on(folder: Path, out: Path, **peft_kw) -> Path:  # noqa: ANN003
    """A PEFT adapter of the model loaded from ``folder`` (so PEFT records that path as its base)."""
    from transformers import AutoModelForCausalLM

    models.make_peft(AutoModelForCausalLM.from_pretrained(str(folder)), out, **peft_kw)
    return out


@pytest.fixture(scope="module")
def w(tmp_module: Path) -> dict[str, Path]:
    llama = models.save_base(models.build_model("llama"), tmp_module / "llama")
    qwen2 = models.save_base(_qwen2(), tmp_module / "qwen2")
    qwen2_deep = models.save_base(_qwen2(layers=3), tmp_module / "qwen2-3layers")
    paths = {"llama": llama, "qwen2": qwen2}
    paths["llama_lora"] = _trained_on(llama, tmp_module / "llama-lora")
    paths["qwen2_lora"] = _trained_on(qwen2, tmp_module / "qwen2-lora")
    # the same shapes in the layers it adapts, one layer more in the model it names
    paths["deep_lora"] = _trained_on(qwen2_deep, tmp_module / "deep-lora", layers_to_transform=[0, 1])
    # no recorded path: PEFT still records the class (task_type None) ...
    paths["class_only"] = tmp_module / "class-only"
    models.make_peft(_qwen2(), paths["class_only"])
    # ... or nothing at all (a task type): no claim, no check
    paths["no_claim"] = tmp_module / "no-claim"
    models.make_peft(_qwen2(), paths["no_claim"], task_type="CAUSAL_LM")
    return paths


def _run(*args) -> tuple[int, str, str]:  # noqa: ANN002
    return models.run_cli(list(args))


def _claim(adapter: Path, out: Path, base_model: str) -> Path:
    """A copy of ``adapter`` that records ``base_model`` as its base."""
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_model
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_merge_refuses_an_adapter_of_another_architecture(w, tmp_path) -> None:  # noqa: ANN001
    code, out, err = _run("merge", w["llama"], w["qwen2_lora"], "-o", tmp_path / "m", "--verify")
    assert code == 2 and out == ""
    assert err == (
        f"Error: {w['qwen2_lora']} was trained on {w['qwen2']}, not on the base {w['llama']}: model_type qwen2 vs "
        "llama\nHint: use the base model the adapter was trained on; if this base is right (a renamed or converted "
        "copy), pass --allow-other-base\n"
    )
    assert not (tmp_path / "m").exists()


def test_merge_of_two_adapters_names_the_one_of_another_base(w, tmp_path) -> None:  # noqa: ANN001
    code, _, err = _run("merge", w["llama"], w["llama_lora"], w["qwen2_lora"], "-o", tmp_path / "m")
    assert code == 2 and err.startswith(f"Error: {w['qwen2_lora']} was trained on {w['qwen2']}")
    assert not (tmp_path / "m").exists()


def test_allow_other_base_merges_it(w, tmp_path) -> None:  # noqa: ANN001
    code, out, _ = _run("merge", w["llama"], w["qwen2_lora"], "-o", tmp_path / "m", "--allow-other-base", "--verify")
    assert code == 0 and "(verified)" in out


def test_sizes_are_compared_when_the_model_type_agrees(w, tmp_path) -> None:  # noqa: ANN001
    """A 3-layer Qwen2's adapter on layers 0-1 fits a 2-layer Qwen2 tensor for tensor; the layer count differs."""
    code, _, err = _run("merge", w["qwen2"], w["deep_lora"], "-o", tmp_path / "m")
    assert code == 2 and err.splitlines()[0].endswith(": num_hidden_layers 3 vs 2")


def test_the_recorded_class_is_a_claim_too(w, tmp_path) -> None:  # noqa: ANN001
    code, _, err = _run("merge", w["llama"], w["class_only"], "-o", tmp_path / "m")
    assert code == 2
    assert err.splitlines()[0] == (
        f"Error: {w['class_only']} was trained on Qwen2ForCausalLM, not on the base {w['llama']}: "
        "architecture qwen2 vs llama"
    )
    assert _run("merge", w["qwen2"], w["class_only"], "-o", tmp_path / "ok")[0] == 0


def test_no_claim_no_check(w, tmp_path) -> None:  # noqa: ANN001
    assert _run("merge", w["llama"], w["no_claim"], "-o", tmp_path / "m")[0] == 0


def test_validate_base_reports_it_and_the_override_makes_it_a_warning(w) -> None:  # noqa: ANN001
    code, out, _ = _run("validate", w["qwen2_lora"], "--base", w["llama"], "--json")
    found = json.loads(out)["findings"]
    assert code == 1 and [(f["severity"], f["code"]) for f in found] == [("error", "base_mismatch")]
    assert "model_type qwen2 vs llama" in found[0]["message"] and "--allow-other-base" in found[0]["hint"]
    code, out, _ = _run("validate", w["qwen2_lora"], "--base", w["llama"], "--allow-other-base")
    assert code == 0 and "warning base_mismatch" in out and "(accepted: --allow-other-base)" in out
    assert _run("validate", w["qwen2_lora"], "--base", w["qwen2"])[0] == 0


def test_combine_applies_the_same_rule(w, tmp_path) -> None:  # noqa: ANN001
    code, _, err = _run("combine", w["llama_lora"], w["qwen2_lora"], "-o", tmp_path / "c")
    assert code == 2 and "(model_type llama vs qwen2)" in err
    code, _, err = _run("combine", w["llama_lora"], w["qwen2_lora"], "--base", w["llama"], "-o", tmp_path / "c")
    assert code == 2 and err.startswith(f"Error: {w['qwen2_lora']} was trained on {w['qwen2']}, not on the base")
    assert not (tmp_path / "c").exists()
    assert _run("combine", w["llama_lora"], w["qwen2_lora"], "--allow-other-base", "-o", tmp_path / "c")[0] == 0


def test_the_python_api_refuses_and_takes_the_override(w, tmp_path) -> None:  # noqa: ANN001
    from loratools import merge, validate
    from loratools.errors import ValidationError

    with pytest.raises(ValidationError, match="model_type qwen2 vs llama"):
        merge(w["llama"], [w["qwen2_lora"]], tmp_path / "m")
    assert merge(w["llama"], [w["qwen2_lora"]], tmp_path / "m", allow_other_base=True).modules_merged == 8
    assert [f.code for f in validate(w["qwen2_lora"], base=w["llama"]).errors] == ["base_mismatch"]


def _cache_with(root: Path, repo_id: str, config: Path) -> Path:
    """A Hugging Face cache holding ``repo_id``'s config.json, laid out as the hub client writes it."""
    org, name = repo_id.split("/")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = root / f"models--{org}--{name}" / "snapshots" / commit
    snap.mkdir(parents=True)
    shutil.copy(config, snap / "config.json")
    (root / f"models--{org}--{name}" / "refs").mkdir()
    (root / f"models--{org}--{name}" / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import: patched as well
    return cache


def test_a_hub_id_is_resolved_in_the_cache_offline(w, tmp_path, hub_cache) -> None:  # noqa: ANN001
    """A hub id vs a local copy of that model: merged; the same id whose cached config is Qwen2: refused."""
    as_hub = _claim(w["llama_lora"], tmp_path / "hub-llama-lora", "org/tiny-llama")
    assert _run("merge", w["llama"], as_hub, "-o", tmp_path / "m1")[0] == 0  # not cached: nothing is known
    _cache_with(hub_cache, "org/tiny-llama", w["llama"] / "config.json")
    assert _run("merge", w["llama"], as_hub, "-o", tmp_path / "m2")[0] == 0
    _cache_with(hub_cache, "org/tiny-qwen2", w["qwen2"] / "config.json")
    wrong = _claim(w["qwen2_lora"], tmp_path / "hub-qwen2-lora", "org/tiny-qwen2")
    code, _, err = _run("merge", w["llama"], wrong, "-o", tmp_path / "m3")
    assert code == 2 and "was trained on org/tiny-qwen2, not on the base" in err


def test_a_merged_output_of_ours_is_its_original_base(w, tmp_path) -> None:  # noqa: ANN001
    """A single-file merged output has no config: its provenance names the base, whose config decides."""
    merged = tmp_path / "alone" / "merged.safetensors"
    merged.parent.mkdir()
    assert _run("merge", w["llama"] / "model.safetensors", w["llama_lora"], "-o", merged)[0] == 0
    assert _run("merge", merged, w["llama_lora"], "-o", tmp_path / "again.safetensors")[0] == 0
    code, _, err = _run("merge", merged, w["qwen2_lora"], "-o", tmp_path / "wrong.safetensors")
    assert code == 2 and "model_type qwen2 vs llama" in err
    folder = tmp_path / "merged-folder"
    assert _run("merge", w["llama"], w["llama_lora"], "-o", folder)[0] == 0
    assert _run("validate", w["llama_lora"], "--base", folder)[0] == 0


def test_a_renamed_model_that_keeps_the_name_is_the_same_model(w, tmp_path) -> None:  # noqa: ANN001
    """A converted copy whose config names the original (``_name_or_path``): the shared name decides."""
    copy = tmp_path / "converted"
    shutil.copytree(w["llama"], copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(w["qwen2"])}))
    assert _run("merge", copy, w["qwen2_lora"], "-o", tmp_path / "m")[0] == 0


@pytest.mark.parametrize(
    ("base", "adapter"),
    [
        ("bases/llama-bnb-nf4", "peft/llama-lora"),  # a quantized copy of the recorded base
        ("bases/llama-tuned", "peft/llama-lora"),  # a fine-tune: another name, the same architecture and sizes
        ("bases/llama-sharded", "peft/llama-dora"),
        ("gguf/llama-f32.gguf", "peft/llama-lora"),  # a GGUF copy
    ],
)
def test_copies_of_the_recorded_base_merge(base: str, adapter: str, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / ("m.gguf" if base.endswith(".gguf") else "m")
    code, _, err = _run("merge", FIXTURES / base, FIXTURES / adapter, "-o", out)
    assert code == 0, err


def test_a_diffusers_lora_given_one_component_folder_is_told_to_use_the_pipeline(tmp_path) -> None:  # noqa: ANN001
    """A bare unet/ folder as the base of a diffusers LoRA (issue 19 section 4): the hint names the pipeline."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "formats"))
    import sd

    pipe = sd.build_pipeline()
    pipeline = sd.save_pipeline(pipe, tmp_path / "pipe")
    lora = sd.save_diffusers_lora(pipe, tmp_path / "lora")
    code, _, err = _run("merge", pipeline / "unet", lora, "-o", tmp_path / "m")
    assert code == 2 and f"is not in the base {pipeline / 'unet'}" in err
    assert err.splitlines()[1] == (
        "Hint: the adapter's modules are named by pipeline component (text_encoder.…): its base is the diffusers "
        f"pipeline folder, the one with model_index.json ({pipeline}), not one component's folder"
    )
    code, out, _ = _run("validate", lora, "--base", pipeline / "unet")
    assert code == 1 and f"model_index.json ({pipeline})" in out
    assert _run("merge", pipeline, lora, "-o", tmp_path / "ok")[0] == 0


def test_convert_to_diffusers_of_a_language_model_adapter_says_what_to_write(tmp_path) -> None:  # noqa: ANN001
    code, _, err = _run("convert", FIXTURES / "peft" / "llama-lora", "--to", "diffusers", "-o", tmp_path / "d")
    assert code == 2 and "kohya" not in err
    assert err.splitlines()[1] == (
        "Hint: a diffusers LoRA adapts a diffusers pipeline (its unet and text encoders), and these are another "
        "model's modules: write --to peft (or --to gguf for llama.cpp)"
    )


@pytest.mark.parametrize(
    "claim",
    ["a\u0000b", "x" * 5000, "hf://org/none", "../../../../..", "llama/model.safetensors", 5, ["org/a"], {"a": 1}, ""],
)
def test_junk_claims_are_no_evidence(w, tmp_path, claim) -> None:  # noqa: ANN001
    """A recorded base that is no usable name (a NUL, 5000 characters, a list, a file): no check, no crash."""
    adapter = _claim(w["no_claim"], tmp_path / "a", claim)
    code, _, err = _run("merge", w["llama"], adapter, "-o", tmp_path / "m")
    assert (code, err) == (0, "")


def test_junk_in_the_claimed_config_is_no_evidence(w, tmp_path) -> None:  # noqa: ANN001
    folder = tmp_path / "odd-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": 7, "architectures": "LlamaForCausalLM", "hidden_size": True, "text_config": [1],
         "num_hidden_layers": -3, "intermediate_size": "48"}
    ))  # fmt: skip
    adapter = _claim(w["no_claim"], tmp_path / "a", str(folder))
    assert _run("merge", w["llama"], adapter, "-o", tmp_path / "m")[0] == 0
    (folder / "config.json").write_text("{not json")
    assert _run("merge", w["llama"], adapter, "-o", tmp_path / "m2")[0] == 0


def test_a_gpt2_adapter_on_another_model_is_not_told_to_use_a_pipeline_folder(tmp_path: Path) -> None:
    """GPT-2's own modules start with ``transformer.`` — a diffusers component name — but a transformers model
    folder is no pipeline component: the hint is the ordinary one."""
    root = Path(__file__).resolve().parents[2] / "fixtures"
    code, _, err = models.run_cli(
        ["merge", root / "bases" / "llama", root / "peft" / "gpt2-lora", "-o", tmp_path / "m", "--allow-other-base"]
    )
    assert code == 2 and "transformer.h." in err, err
    assert "pipeline" not in err, err


def test_validate_refuses_allow_other_base_without_a_base() -> None:
    """An option is never ignored: --allow-other-base has nothing to allow without --base."""
    root = Path(__file__).resolve().parents[2] / "fixtures"
    code, out, err = models.run_cli(["validate", root / "peft" / "llama-lora", "--allow-other-base"])
    assert code == 2 and "needs --base BASE" in err, out + err
