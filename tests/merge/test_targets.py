"""Merge targets (issue 18): one per base kind, picked in order; options a kind does not take are refused in
one message built from what it accepts; ``merge(base, adapters, out, **options)`` still works."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from merge_support import models

from loratools.errors import UsageError
from loratools.ops.merge import MergeOptions, merge
from loratools.ops.merge.targets import ORDER, target_for, targets

run_cli = models.run_cli
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

BASE = FIXTURES / "bases" / "llama"
LORA = FIXTURES / "peft" / "llama-lora"


def test_every_listed_target_loads_and_the_folder_target_is_last() -> None:
    loaded = targets()
    assert [t.__name__ for t in loaded] == [e.split(":")[1] for e in ORDER]
    assert loaded[-1].__name__ == "FolderTarget" and all(t.label and t.why for t in loaded)


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("make", "options", "name"),
    [
        (lambda tmp: BASE, {}, "FolderTarget"),
        (lambda tmp: shutil.copy(BASE / "model.safetensors", tmp / "model.safetensors"), {}, "SingleFileTarget"),
        (lambda tmp: FIXTURES / "gguf" / "llama-q8_0.gguf", {}, "GgufTarget"),
        (lambda tmp: FIXTURES / "bases" / "llama-bnb-nf4", {"requantize": True}, "RequantizeTarget"),
        (lambda tmp: FIXTURES / "bases" / "llama-bnb-nf4", {"reference": BASE}, "QuantizedTarget"),
        (lambda tmp: _touch(tmp / "model.onnx"), {}, "OnnxTarget"),
    ],
)
def test_target_for_picks_the_base_kind(tmp_path: Path, make, options, name) -> None:
    base = Path(make(tmp_path))
    assert target_for(base, MergeOptions(**options)).__name__ == name


@pytest.mark.parametrize(
    ("base", "option", "message"),
    [
        (
            FIXTURES / "gguf" / "llama-q8_0.gguf",
            ["--dtype", "bf16", "--device", "cuda"],
            "Error: --dtype bf16, --device cuda: merging into a GGUF model does not take these options (it keeps "
            "each tensor's own type in one file on the CPU)",
        ),
        (
            BASE,
            ["--skip-module", "model.layers.0.self_attn.q_proj"],
            "Error: --skip-module model.layers.0.self_attn.q_proj: merging into a model folder does not take this "
            "option",
        ),
        (
            FIXTURES / "bases" / "llama-bnb-nf4",
            ["--requantize", "--verify"],
            "Error: --verify: merging into a quantized base with --requantize does not take this option",
        ),
    ],
)
def test_one_refusal_names_the_options_the_base_kind_does_not_take(tmp_path, base, option, message) -> None:
    code, out, err = run_cli(["merge", base, LORA, "-o", tmp_path / "m", *option])
    assert code == 2 and not out, err
    assert err.splitlines()[0].startswith(message), err
    assert "Hint: leave out" in err
    assert not (tmp_path / "m").exists()


def test_a_single_file_base_refuses_max_shard_size_before_reading_anything(tmp_path: Path) -> None:
    single = Path(shutil.copy(BASE / "model.safetensors", tmp_path / "model.safetensors"))
    code, _, err = run_cli(["merge", single, LORA, "-o", tmp_path / "m.safetensors", "--max-shard-size", "1MB"])
    assert code == 2 and "merging into a single .safetensors file does not take this option" in err, err
    assert "takes --device, --dtype, --expand-base, --verify" in err


def test_keyword_options_and_an_options_object_give_the_same_merge(tmp_path: Path) -> None:
    a = merge(BASE, [LORA], tmp_path / "a", weights=[0.5], dtype="fp32")
    b = merge(BASE, [LORA], tmp_path / "b", MergeOptions(weights=[0.5], dtype="fp32"))
    assert a.modules_merged == b.modules_merged == 8
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (BASE / "model.safetensors").read_bytes()
    from safetensors.torch import load_file

    ta, tb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)


def test_an_unknown_option_or_both_forms_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown option 'weight'"):
        merge(BASE, [LORA], tmp_path / "a", weight=[1.0])
    with pytest.raises(UsageError, match="not both"):
        merge(BASE, [LORA], tmp_path / "a", MergeOptions(), verify=True)
    assert not (tmp_path / "a").exists()
