"""Merging adapters straight into ONNX initializers equals exporting the merged checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_support import KINDS, run


@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_our_export_equals_merged_export(tiny, kind, tmp_path):
    from loratools.onnx.patch import merge_onnx

    t = tiny(kind)
    feed = t.feed()
    merged = run(t.export("merged", adapters=[t.adapter]), feed)
    assert np.abs(merged - run(t.export("base"), feed)).max() > 1e-2
    result = merge_onnx(t.export("base"), [t.adapter], tmp_path / "patched")
    assert result.modules == len(t.peft.peft_config["default"].target_modules) * 2 or result.modules > 0
    assert np.abs(run(tmp_path / "patched", feed) - merged).max() <= 1e-4
    assert (tmp_path / "patched" / "config.json").is_file()


def _default_export(t, folder):
    """A plain torch.onnx.export with its defaults (dynamo, optimizer on: folded val_N initializers)."""
    import copy

    import torch

    model = copy.deepcopy(t.model)
    model.config.use_cache = False
    folder.mkdir()
    torch.onnx.export(model, (), kwargs=dict(t.feed()), dynamo=True).save(str(folder / "model.onnx"))
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_default_torch_export(tiny, kind, tmp_path):
    from loratools.onnx.patch import merge_onnx

    t = tiny(kind)
    feed = t.feed()
    default = _default_export(t, tmp_path / "default")
    result = merge_onnx(default, [t.adapter], tmp_path / "patched")
    if kind != "gpt2":  # GPT-2's Conv1D weights are used as stored; Linear weights get folded transposes
        assert result.folded > 0
    merged = run(t.export("merged", adapters=[t.adapter]), feed)
    assert np.abs(run(default, feed) - merged).max() > 1e-2
    assert np.abs(run(tmp_path / "patched", feed) - merged).max() <= 1e-4


def test_weights_and_external_data_split_over_many_files(tiny, tmp_path):
    import onnx

    from loratools.onnx.patch import merge_onnx

    t = tiny("llama")
    feed = t.feed()
    # the base export re-saved with one external file per tensor, in a sub folder
    proto = onnx.load(str(t.export("base") / "model.onnx"))
    (tmp_path / "split").mkdir()
    onnx.save_model(proto, str(tmp_path / "split" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)  # fmt: skip
    merge_onnx(tmp_path / "split", [t.adapter, t.adapter], tmp_path / "zero", weights=[0.5, -0.5])
    out = sorted(p.name for p in (tmp_path / "zero").iterdir())
    assert [f for f in out if f.endswith((".onnx", ".data"))] == ["model.onnx", "model.onnx.data"]
    assert np.abs(run(tmp_path / "zero", feed) - run(t.export("base"), feed)).max() <= 1e-5
    merge_onnx(tmp_path / "split", [t.adapter, t.adapter], tmp_path / "twice", weights=[0.5, 0.5])
    merged = run(t.export("merged", adapters=[t.adapter]), feed)
    assert np.abs(run(tmp_path / "twice", feed) - merged).max() <= 1e-4


def test_unresolvable_weights_and_existing_output(tiny, tmp_path):
    from loratools.errors import OutputExistsError, ValidationError
    from loratools.onnx.patch import merge_onnx

    llama, gpt2 = tiny("llama"), tiny("gpt2")
    with pytest.raises(ValidationError, match="trained on LlamaForCausalLM, not on the base"):  # the wrong-base rule
        merge_onnx(gpt2.export("base"), [llama.adapter], tmp_path / "bad")
    with pytest.raises(ValidationError, match="no weight for .*q_proj"):
        merge_onnx(gpt2.export("base"), [llama.adapter], tmp_path / "bad", allow_other_base=True)
    assert not (tmp_path / "bad").exists()
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        merge_onnx(llama.export("base"), [llama.adapter], tmp_path / "exists")


def test_merge_given_an_onnx_file_uses_that_file(tiny, tmp_path):
    """`loratools merge some.onnx ...` patches the named graph, not the folder's model.onnx."""
    import shutil

    from loratools import merge

    t = tiny("llama")
    feed = t.feed()
    folder = tmp_path / "two-graphs"
    shutil.copytree(t.export("base"), folder)
    (folder / "model.onnx").rename(folder / "chosen.onnx")
    (folder / "model.onnx").write_bytes(b"not a graph")  # a decoy the folder lookup would take
    merge(folder / "chosen.onnx", [t.adapter], tmp_path / "patched")
    merged = run(t.export("merged", adapters=[t.adapter]), feed)
    assert np.abs(run(tmp_path / "patched", feed) - merged).max() <= 1e-4
