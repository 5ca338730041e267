"""Modules whose weight the export left out (BERT's pooler) and the options of merge into ONNX.

Issue 14.3: a PEFT adapter on ``dense`` also adapts ``pooler.dense``, which an export for
``last_hidden_state`` drops; merge into ONNX and ``--lora-slots`` refused it. Our exports now record the
dropped tensors, so the module is skipped (and said so); a foreign export keeps the refusal, with
``--skip-module``. Issue 14.17: merge into ONNX silently ignored --include/--exclude/--dtype/--verify/
--max-shard-size/--device. Issue 15.9: one --device cuda refusal for merge and export-onnx.
"""

from __future__ import annotations

import json
import shutil

import models
import numpy as np
import pytest
from onnx_support import run, run_cli

SKIP_LINE = (
    "skipped pooler.dense: the export left pooler.dense.weight out of the graph, so it cannot change the outputs"
)


@pytest.fixture(scope="module")
def dense(tiny, tmp_path_factory):
    """The tiny BERT, its base export, and an adapter on every ``dense`` (pooler included)."""
    t = tiny("bert")
    root = tmp_path_factory.mktemp("dense")
    peft = models.make_peft(t.model, root / "dense", kind="bert", target_modules=["dense"], seed=3)
    assert "pooler.dense" in {n.split("base_model.model.")[-1].rsplit(".lora_A", 1)[0] for n, _ in
                              peft.named_parameters() if "lora_A" in n}  # fmt: skip
    return t, root / "dense", peft


def test_our_export_records_the_pooler_as_dropped(dense):
    t, _, _ = dense
    manifest = json.loads((t.export("base") / "loratools_onnx.json").read_text())
    assert manifest["dropped"] == ["pooler.dense.bias", "pooler.dense.weight"]


def test_merge_skips_a_module_the_export_dropped(dense, tmp_path):
    t, adapter, peft = dense
    feed = t.feed()
    code, out, err = run_cli(["merge", t.export("base"), adapter, "-o", tmp_path / "m"])
    assert code == 0, err
    assert out.splitlines()[1:] == [SKIP_LINE]
    ref = models.outputs(peft, feed).numpy()
    assert np.abs(ref - models.outputs(t.model, feed).numpy()).max() > 1e-2
    assert np.abs(run(tmp_path / "m", feed) - ref).max() <= 1e-4


def _foreign(t, folder):
    """Our base export without the record (as another exporter would write it)."""
    import onnx

    shutil.copytree(t.export("base"), folder)
    (folder / "loratools_onnx.json").unlink()
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    kept = [p for p in proto.metadata_props if p.key != "loratools.dropped"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(folder / "model.onnx"))
    return folder


def test_foreign_export_keeps_the_refusal_and_skip_module_opts_in(dense, tmp_path):
    t, adapter, peft = dense
    foreign = _foreign(t, tmp_path / "foreign")
    code, out, err = run_cli(["merge", foreign, adapter, "-o", tmp_path / "m"])
    assert code == 2 and not out
    assert err.splitlines() == [
        f"Error: {foreign / 'model.onnx'}: no weight for 1 module(s) of {adapter}: pooler.dense "
        "(looked up by initializer name and by onnxscript folded_from metadata)",
        "Hint: export the model with `loratools export-onnx` (names kept, dropped weights recorded); "
        "if this graph left them out on purpose, pass --skip-module pooler.dense (once per module)",
    ]
    assert not (tmp_path / "m").exists()
    code, out, err = run_cli(["merge", foreign, adapter, "-o", tmp_path / "m", "--skip-module", "pooler.dense"])
    assert code == 0, err
    assert out.splitlines()[1:] == ["skipped pooler.dense: named with --skip-module"]
    feed = t.feed()
    assert np.abs(run(tmp_path / "m", feed) - models.outputs(peft, feed).numpy()).max() <= 1e-4
    code, _, err = run_cli(["merge", foreign, adapter, "-o", tmp_path / "x", "--skip-module", "pooler.denso"])
    assert code == 2 and err.splitlines() == ["Error: --skip-module pooler.denso: no adapter has a module of that name"]


def test_lora_slots_skip_the_dropped_module(dense, tmp_path):
    t, adapter, peft = dense
    code, out, err = run_cli(["export-onnx", t.base, "--lora-slots", adapter, "-o", tmp_path / "s"])
    assert code == 0, err  # verified with the adapter fed through the slots
    assert out.splitlines()[1] == (
        "no LoRA slot for pooler.dense: the export left pooler.dense.weight out of the graph, "
        "so it cannot change the outputs"
    )
    manifest = json.loads((tmp_path / "s" / "loratools_onnx.json").read_text())
    assert "pooler.dense" not in manifest["slots"] and len(manifest["slots"]) == 6
    out_file = tmp_path / "a.onnx_adapter"  # the adapter file for that graph leaves the pooler out too
    code, out, err = run_cli(["convert", adapter, "--to", "onnx-adapter", "--for", tmp_path / "s", "-o", out_file])
    assert code == 0, err
    assert out.splitlines() == [
        f"wrote {out_file} (onnx-adapter, 6 adapter modules, from peft)",
        "skipped pooler.dense: the export left pooler.dense.weight out of the graph, so it cannot change the outputs",
    ]
    feed = t.feed()
    assert np.abs(run(tmp_path / "s", feed, out_file) - models.outputs(peft, feed).numpy()).max() <= 1e-4


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--dtype", "fp16"], "Error: --dtype fp16: merging into an ONNX model does not take this option (it keeps"),
        (["--max-shard-size", "1GB"], "Error: --max-shard-size 1GB: merging into an ONNX model does not take this"),
        (["--device", "cuda"], "Error: --device cuda: merging into an ONNX model does not take this option"),
        (["--exclude", ".*"], "Error: no adapter module is left to merge"),
    ],
)
def test_merge_into_onnx_refuses_what_it_cannot_honour(dense, tmp_path, option, message):
    t, adapter, _ = dense
    code, out, err = run_cli(["merge", t.export("base"), adapter, "-o", tmp_path / "m", *option])
    assert code == 2 and not out
    assert err.splitlines()[0].startswith(message)  # one refusal built from what the target accepts
    assert not (tmp_path / "m").exists()


def test_merge_into_onnx_include_and_verify(dense, tmp_path):
    t, adapter, _ = dense
    code, out, err = run_cli(
        ["merge", t.export("base"), adapter, "-o", tmp_path / "m", "--include", r"intermediate\.dense$", "--verify",
         "--json"]
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["modules_merged"] == 2 and data["verified"] is True and data["verify_error"] <= 1.0
    assert data["skipped"] == {}
    only = models.make_peft(t.model, None, kind="bert", target_modules=["dense"], seed=3)
    for name, module in only.named_modules():  # the reference: the same adapter with only intermediate.dense
        if hasattr(module, "lora_B") and not name.endswith("intermediate.dense"):
            module.lora_B["default"].weight.data.zero_()
    feed = t.feed()
    assert np.abs(run(tmp_path / "m", feed) - models.outputs(only, feed).numpy()).max() <= 1e-4


def test_verify_catches_a_wrong_write(dense, tmp_path, monkeypatch):
    from loratools.errors import VerificationError
    from loratools.onnx import patch

    t, adapter, _ = dense
    add_delta = patch.add_delta
    monkeypatch.setattr(patch, "add_delta", lambda acc, site, module, w: add_delta(acc, site, module, 2 * w))
    with pytest.raises(VerificationError, match="read back differs from base \\+ update"):
        patch.merge_onnx(t.export("base"), [adapter], tmp_path / "m", verify=True)
    assert not (tmp_path / "m").exists()


def test_device_cuda_refusal_is_worded_the_same(tiny, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    t = tiny("llama")
    lines = []
    for argv in (["merge", t.base, t.adapter], ["export-onnx", t.base]):
        code, out, err = run_cli([*argv, "-o", tmp_path / "o", "--device", "cuda"])
        assert code == 2 and not out
        lines.append(err.splitlines())
    assert (
        lines[0]
        == lines[1]
        == [
            "Error: --device cuda: PyTorch sees no CUDA GPU on this machine",
            "Hint: use --device cpu (the default), or run on a machine with a GPU",
        ]
    )
