"""export-onnx: merged exports equal the unmerged PeftModel under onnxruntime; layout of the output."""

from __future__ import annotations

import json

import models
import numpy as np
import pytest
from onnx_support import KINDS, run, run_cli


@pytest.mark.parametrize("kind", KINDS)
def test_merged_export_equals_unmerged_peft(tiny, kind):
    t = tiny(kind)
    feed = t.feed()
    base_ref = models.outputs(t.model, feed).numpy()
    peft_ref = models.outputs(t.peft, feed).numpy()
    assert np.abs(peft_ref - base_ref).max() > 1e-2  # the adapter moves outputs far beyond the tolerance
    merged = run(t.export("merged", adapters=[t.adapter]), feed)
    assert np.abs(merged - peft_ref).max() <= 1e-4
    base = run(t.export("base"), feed)
    assert np.abs(base - base_ref).max() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_export_layout_names_and_dynamic_axes(tiny, kind):
    import onnx

    from loratools.checkpoint.reader import open_checkpoint

    t = tiny(kind)
    out = t.export("base")
    files = sorted(p.name for p in out.iterdir())
    assert [f for f in files if f.endswith((".onnx", ".data"))] == ["model.onnx", "model.onnx.data"]
    assert "config.json" in files
    manifest = json.loads((out / "loratools_onnx.json").read_text())
    assert manifest["verified"] and manifest["max_diff"] <= 1e-4
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    locations = {e.value for t_ in proto.graph.initializer for e in t_.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    with open_checkpoint(t.base) as reader:
        keys = set(reader.keys())
    weights = {i.name for i in proto.graph.initializer if i.name.endswith(".weight")}
    assert weights and weights <= keys  # every weight matrix is findable by its checkpoint name
    names = [i.name for i in proto.graph.input]
    expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if kind == "bert" else [])
    assert names == expected
    for value in proto.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [o.name for o in proto.graph.output] == ["last_hidden_state" if kind == "bert" else "logits"]
    # other batch and sequence sizes than the traced ones
    feed = t.feed(batch=3, seq=11)
    assert np.abs(run(out, feed) - models.outputs(t.model, feed).numpy()).max() <= 1e-4


def test_failed_verification_publishes_nothing(tiny, tmp_path, monkeypatch):
    from loratools.errors import VerificationError
    from loratools.onnx import export

    t = tiny("gpt2")
    monkeypatch.setattr(export, "tolerance", lambda dtype, scale: -1.0)  # no difference can pass
    with pytest.raises(VerificationError) as info:
        export.export_onnx(t.base, tmp_path / "out")
    assert info.value.exit_code == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "loratools-tmp" in p.name]


def test_cli_export_json_and_errors(tiny, tmp_path):
    t = tiny("bert")
    code, out, _ = run_cli(["export-onnx", t.base, "-o", tmp_path / "o", "--no-verify", "--json"])
    assert code == 0, out
    data = json.loads(out)
    assert data["schema_version"] == 1 and data["verified"] is False and data["task"] == "encoder"
    code, _, err = run_cli(["export-onnx", t.base, "-o", tmp_path / "o", "--no-verify"])
    assert code == 2 and "exists" in err and "Hint:" in err
