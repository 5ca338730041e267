"""Numeric safety: NaN/Inf refused by every writing command (file, tensor, first index); fp16 overflow named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reliability_support import (
    LLAMA_BASE,
    LLAMA_LORA,
    PEFT_Q0,
    Q0,
    assert_one_line_error,
    damaged_adapter,
    invoke,
    leftovers,
    tree_digest,
)

from loratools.files.safetensors_file import load_file


@pytest.fixture(scope="module")
def nan_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def edit(t):  # noqa: ANN001, ANN202
        t[f"{PEFT_Q0}.lora_B.weight"][5, 2] = float("nan")
        t[f"{PEFT_Q0}.lora_B.weight"][7, 0] = float("inf")

    return damaged_adapter(tmp_path_factory.mktemp("nan") / "adapter", edit)


@pytest.fixture(scope="module")
def huge_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Finite factors whose product overflows fp16 (|ΔW| ~ 1e6), and fits fp32 easily."""

    def edit(t):  # noqa: ANN001, ANN202
        t[f"{PEFT_Q0}.lora_A.weight"] *= 1000.0
        t[f"{PEFT_Q0}.lora_B.weight"] *= 1000.0

    return damaged_adapter(tmp_path_factory.mktemp("huge") / "adapter", edit)


WRITERS = {
    "merge": lambda a, o: ("merge", LLAMA_BASE, a, "-o", o),
    "merge-fp16": lambda a, o: ("merge", LLAMA_BASE, a, "-o", o, "--dtype", "fp16"),
    "resize": lambda a, o: ("resize", a, "--rank", "2", "-o", o),
    "rescale": lambda a, o: ("rescale", a, "--scale", "0.5", "-o", o),
    "combine": lambda a, o: ("combine", LLAMA_LORA, a, "-o", o),
    "convert": lambda a, o: ("convert", a, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", f"{o}.safetensors"),
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_nan_in_the_adapter_is_refused(nan_adapter: Path, tmp_path: Path, command: str) -> None:
    before = tree_digest(nan_adapter)
    code, out, err = invoke(*WRITERS[command](nan_adapter, tmp_path / "out"))
    where = f"{nan_adapter / 'adapter_model.safetensors'}: tensor {Q0}.lora_B"
    assert_one_line_error(code, out, err, f"{where} holds NaN/Inf values (first at index [5, 2]: nan)")
    assert leftovers(tmp_path, "out") == [] and not (tmp_path / "out.safetensors").exists()
    assert tree_digest(nan_adapter) == before


def test_nan_in_a_finetuned_checkpoint_is_refused_by_extract(tmp_path: Path) -> None:
    tuned = tmp_path / "tuned"
    shutil.copytree(LLAMA_BASE, tuned)
    from safetensors.torch import save_file

    tensors, meta = load_file(tuned / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 4] = float("-inf")
    save_file(tensors, str(tuned / "model.safetensors"), metadata=meta)
    code, out, err = invoke("extract", LLAMA_BASE, tuned, "--rank", "2", "-o", tmp_path / "out")
    assert_one_line_error(
        code, out, err, f"{tuned / 'model.safetensors'}: tensor model.layers.1.self_attn.o_proj.weight holds NaN/Inf"
    )
    assert "first at index [3, 4]: -inf" in err and leftovers(tmp_path, "out") == []


def test_an_overflowing_result_is_refused_before_writing(tmp_path: Path) -> None:
    """rescale --alpha keeps ΔW by growing B: 7/4 ÷ (1e-38/4) overflows fp32, and nothing is written."""
    code, out, err = invoke("rescale", LLAMA_LORA, "--alpha", "1e-38", "-o", tmp_path / "out")
    assert_one_line_error(code, out, err, f"the output {tmp_path / 'out'}: tensor ")
    assert "holds NaN/Inf values (first at index" in err and leftovers(tmp_path, "out") == []


def test_merge_to_fp16_overflow_names_the_tensor(huge_adapter: Path, tmp_path: Path) -> None:
    code, out, err = invoke("merge", LLAMA_BASE, huge_adapter, "-o", tmp_path / "out", "--dtype", "fp16")
    assert_one_line_error(code, out, err, f"tensor {Q0}.weight: the merged values overflow fp16")
    assert leftovers(tmp_path, "out") == []
    # the same merge in fp32 is fine: the check is about the cast, not the adapter
    code, out, err = invoke("merge", LLAMA_BASE, huge_adapter, "-o", tmp_path / "ok", "--dtype", "fp32")
    assert code == 0, err


def test_onnx_adapter_fp16_overflow_names_the_tensor(tmp_path: Path) -> None:
    """The slot B holds scale·B: a factor of 1e5 fits fp32 and overflows fp16."""
    pytest.importorskip("onnxruntime")

    def edit(t):  # noqa: ANN001, ANN202
        t[f"{PEFT_Q0}.lora_B.weight"] *= 1e5

    big = damaged_adapter(tmp_path / "big", edit)
    slots = tmp_path / "slots"  # an .onnx_adapter is written for one slot graph (--for, issue 19.4)
    code, _, err = invoke("export-onnx", LLAMA_BASE, "--lora-slots", LLAMA_LORA, "-o", slots)
    assert code == 0, err
    target = tmp_path / "a.onnx_adapter"
    from loratools.errors import NumericError
    from loratools.formats.adapter_io import load_adapter, save_adapter

    with pytest.raises(NumericError, match=f"tensor {Q0}.lora_B.weight overflows float16"):  # the writer's check
        save_adapter(load_adapter(big), target, format="onnx-adapter", dtype="fp16")
    assert not target.exists() and leftovers(tmp_path, target.name) == []
    code, out, err = invoke("convert", big, "--to", "onnx-adapter", "--for", slots, "--dtype", "fp32", "-o", target)
    assert code == 0, err
