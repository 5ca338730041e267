"""Words around the ONNX commands: options checked up front (15.4), onnxruntime's errors in one clean line
(15.5), the task a graph serves (15.7), and the session option that quiets slot graphs (15.8)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import models
import pytest
from onnx_support import run_cli

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ROOT / "fixtures" / "bases" / "llama"


def _usage(command: str, error: str) -> list[str]:
    return [f"Usage: loratools {command} [OPTIONS] MODEL", f"Try 'loratools {command} --help' for help.", "", error]


@pytest.mark.parametrize(
    ("argv", "lines"),
    [
        (
            ["export-onnx", LLAMA, "-o", "{out}", "--opset", "17"],
            _usage("export-onnx", "Error: Invalid value for '--opset': must be an integer in [18, 23], got 17"),
        ),
        (
            ["export-onnx", LLAMA, "-o", "{out}", "--opset", "99"],
            _usage("export-onnx", "Error: Invalid value for '--opset': must be an integer in [18, 23], got 99"),
        ),
        (
            ["export-onnx", LLAMA, "-o", "{out}", "--weights", "0.5"],
            _usage("export-onnx", "Error: Invalid value for --weights: got 1 weights for 0 adapters"),
        ),
        (
            ["bench", LLAMA, "--repeats", "0"],
            _usage("bench", "Error: Invalid value for '--repeats': must be an integer >= 1, got 0"),
        ),
        (
            ["bench", LLAMA, "--warmup", "-1"],
            _usage("bench", "Error: Invalid value for '--warmup': must be an integer >= 0, got -1"),
        ),
    ],
)
def test_options_are_checked_before_any_work(tmp_path, argv, lines):
    code, out, err = run_cli([str(a).replace("{out}", str(tmp_path / "o")) for a in argv])
    assert code == 2 and not out
    assert err.splitlines() == lines
    assert not (tmp_path / "o").exists()


def test_library_refuses_an_opset_torch_cannot_write(tmp_path):
    from loratools.errors import UsageError
    from loratools.onnx.export import export_onnx

    with pytest.raises(UsageError, match=r"--opset must be an integer in \[18, 23\], got 17"):
        export_onnx(LLAMA, tmp_path / "o", opset=17)


@pytest.mark.parametrize("command", ["info", "validate"])
def test_garbage_onnx_adapter_is_one_clean_line(command):
    garbage = ROOT / "fixtures" / "broken" / "garbage.onnx_adapter"
    code, out, err = run_cli([command, garbage])
    assert code == 2 and not out
    assert err.splitlines() == [
        f"Error: {garbage}: not a readable .onnx_adapter file "
        "(The buffer does not appear to be a valid lora parameter format)"
    ]


def test_ort_message_strips_the_cpp_location():
    from loratools.onnx.runtime import ort_message

    raw = RuntimeError(
        "/onnxruntime_src/onnxruntime/lora/adapter_format_utils.cc:93 const onnxruntime::adapters::Adapter* "
        "onnxruntime::adapters::utils::ValidateAndGetAdapterFromBytes(gsl::span<const unsigned char>) "
        "The buffer does not appear to be a valid lora parameter format\n"
    )
    assert ort_message(raw) == "The buffer does not appear to be a valid lora parameter format"
    assert ort_message(RuntimeError("plain words")) == "plain words"
    status = RuntimeError(
        "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from m.onnx failed:Protobuf parsing failed."
    )
    assert ort_message(status) == "Load model from m.onnx failed:Protobuf parsing failed."


def test_a_model_onnxruntime_cannot_load_is_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.onnx").write_bytes(b"not a graph")
    from loratools.errors import FormatError
    from loratools.onnx.runtime import session

    with pytest.raises(FormatError) as info:
        session(tmp_path / "bad")
    assert str(info.value) == (
        f"{tmp_path / 'bad' / 'model.onnx'}: onnxruntime cannot load this model "
        f"(Load model from {tmp_path / 'bad' / 'model.onnx'} failed:Protobuf parsing failed.)"
    )


def test_bench_checks_the_adapter_before_exporting(tmp_path):
    code, out, err = run_cli(["bench", LLAMA, "--adapter", tmp_path / "missing", "--work-dir", tmp_path / "w"])
    assert code == 2 and not out
    assert err.splitlines() == [f"Error: {tmp_path / 'missing'}: no such adapter file or folder"]
    assert not (tmp_path / "w" / "base").exists()  # nothing was exported first


@pytest.mark.parametrize(
    ("cls", "config", "task"),
    [
        ("BertForSequenceClassification", "bert", "sequence-classification"),
        ("LlamaForSequenceClassification", "llama", "sequence-classification"),
        ("BertForTokenClassification", "bert", "token-classification"),
        ("BertForMaskedLM", "bert", "masked-lm"),
        ("LlamaForCausalLM", "llama", "causal-lm"),
        ("BertModel", "bert", "encoder"),
    ],
)
def test_task_comes_from_the_model_class(tmp_path, cls, config, task):
    import transformers

    from loratools.onnx.export import load_model

    cfg = getattr(models, f"{config}_config")(**({"pad_token_id": 0} if config == "llama" else {}))
    getattr(transformers, cls)(cfg).save_pretrained(tmp_path / cls)
    assert load_model(tmp_path / cls).task == task


def test_sequence_classifier_export_is_labelled_so(tmp_path):
    import transformers

    transformers.BertForSequenceClassification(models.bert_config(num_labels=3)).save_pretrained(tmp_path / "cls")
    code, out, err = run_cli(["export-onnx", tmp_path / "cls", "-o", tmp_path / "o", "--no-verify", "--json"])
    assert code == 0, err
    assert json.loads(out)["task"] == "sequence-classification"
    assert json.loads((tmp_path / "o" / "loratools_onnx.json").read_text())["task"] == "sequence-classification"


QUIET = """
import onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 3  # errors only: no "Initializer ... appears in graph inputs" per LoRA input
ort.InferenceSession(MODEL, sess_options=options, providers=["CPUExecutionProvider"])
"""


def test_slot_graph_warnings_and_the_documented_option(tiny):
    """ORT warns twice per slot (an overridable initializer is a graph input: no other way keeps 'no adapter =
    base model'); the session option docs/onnx.md gives silences exactly that."""
    t = tiny("llama")
    model = repr(str(t.export("slots", lora_slots=t.adapter) / "model.onnx"))
    loud = "import onnxruntime as ort\nort.InferenceSession(MODEL, providers=['CPUExecutionProvider'])\n"
    runs = [
        subprocess.run([sys.executable, "-c", f"MODEL = {model}\n{code}"], capture_output=True, text=True, check=True)
        for code in (loud, QUIET)
    ]
    assert runs[0].stderr.count("appears in graph inputs") == 2 * 8
    assert runs[1].stderr == ""
    docs = (ROOT / "docs" / "onnx.md").read_text()
    assert "options.log_severity_level = 3" in docs
