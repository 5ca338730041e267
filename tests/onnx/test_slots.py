"""LoRA slots: adapters fed through ort.LoraAdapter + RunOptions.add_active_adapter on one session."""

from __future__ import annotations

import models
import numpy as np
import pytest
from onnx_support import run


@pytest.fixture(scope="module")
def slots(tiny, tmp_path_factory):
    """Llama exported with slots for adapter 1 (q, v, up, down) and both adapters as .onnx_adapter files."""
    from loratools.formats.adapter_io import load_adapter, save_adapter

    t = tiny("llama")
    folder = t.export("slots", lora_slots=t.adapter)  # verification with and without the adapter runs here
    files = tmp_path_factory.mktemp("adapters")
    for name, src in (("a1", t.adapter), ("a2", t.adapter2)):
        save_adapter(load_adapter(src), files / f"{name}.onnx_adapter", format="onnx-adapter", model=folder)
    return t, folder, files


def test_slot_graph_inputs(slots):
    import onnx

    from loratools.onnx.slots import slot_modules

    t, folder, _ = slots
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    found = slot_modules(proto)
    assert "model.layers.0.self_attn.q_proj" in found and len(found) == 8
    a = next(i for i in proto.graph.input if i.name == "model.layers.0.mlp.down_proj.lora_A.weight")
    dims = a.type.tensor_type.shape.dim
    assert dims[0].dim_value == 48 and not dims[1].dim_value  # [in, dynamic rank]
    init = {i.name: list(i.dims) for i in proto.graph.initializer}
    assert init["model.layers.0.mlp.down_proj.lora_A.weight"] == [48, 0]
    assert init["model.layers.0.mlp.down_proj.lora_B.weight"] == [0, 32]


def test_slots_without_adapter_equal_base_and_with_adapter_equal_merged(slots):
    t, folder, files = slots
    feed = t.feed()
    base = run(t.export("base"), feed)
    merged = run(t.export("merged", adapters=[t.adapter]), feed)
    assert np.abs(merged - base).max() > 1e-2
    assert np.abs(run(folder, feed) - base).max() <= 1e-5
    assert np.abs(run(folder, feed, files / "a1.onnx_adapter") - merged).max() <= 1e-4


def test_second_adapter_other_rank_subset_same_session(slots):
    from loratools.onnx.runtime import run_with_adapter, session

    t, folder, files = slots
    feed = t.feed()
    np_feed = {k: v.numpy() for k, v in feed.items()}
    sess = session(folder)
    ref1 = models.outputs(t.peft, feed).numpy()
    ref2 = models.outputs(t.peft2, feed).numpy()  # rank 6, only q_proj and v_proj: a subset of the slots
    assert np.abs(ref2 - ref1).max() > 1e-2
    for _ in range(2):  # switch back and forth without reloading
        out1 = run_with_adapter(sess, np_feed, files / "a1.onnx_adapter")[0]
        out2 = run_with_adapter(sess, np_feed, files / "a2.onnx_adapter")[0]
        assert np.abs(out1 - ref1).max() <= 1e-4
        assert np.abs(out2 - ref2).max() <= 1e-4
    base = run_with_adapter(sess, np_feed, None)[0]
    assert np.abs(base - models.outputs(t.model, feed).numpy()).max() <= 1e-4


def test_onnx_adapter_round_trip_and_refusals(slots, tmp_path):
    import torch

    from loratools.errors import UnsupportedError, ValidationError
    from loratools.formats.adapter_io import load_adapter, save_adapter

    t, folder, files = slots
    back = load_adapter(files / "a1.onnx_adapter")
    assert back.format == "onnx-adapter"
    orig = load_adapter(t.adapter)
    assert set(back.modules) == set(orig.modules)
    for name, module in orig.modules.items():
        assert torch.allclose(back.modules[name].delta(), module.delta(), atol=1e-6)
    with pytest.raises(ValidationError, match="takes float32"):
        save_adapter(orig, tmp_path / "x.onnx_adapter", format="onnx-adapter", model=folder, dtype="fp16")
    outside = models.make_peft(t.model, tmp_path / "k", kind="llama", target_modules=["k_proj"])
    del outside
    with pytest.raises(ValidationError, match="no LoRA slot"):
        save_adapter(load_adapter(tmp_path / "k"), tmp_path / "k.onnx_adapter", format="onnx-adapter", model=folder)
    models.make_peft(t.model, tmp_path / "dora", kind="llama", use_dora=True)
    with pytest.raises(UnsupportedError, match="DoRA"):
        save_adapter(load_adapter(tmp_path / "dora"), tmp_path / "d.onnx_adapter", format="onnx-adapter")
    models.make_peft(t.model, tmp_path / "emb", kind="llama", target_modules=["embed_tokens"])
    with pytest.raises(UnsupportedError, match="embedding"):
        save_adapter(load_adapter(tmp_path / "emb"), tmp_path / "e.onnx_adapter", format="onnx-adapter")
    assert not list(tmp_path.glob("*.onnx_adapter"))


def test_fp16_slots_export_adapter_file_and_merge(tiny, tmp_path):
    """fp16: the slot graph verifies with and without the adapter; merging into it matches the slot run."""
    from loratools.formats.adapter_io import load_adapter, save_adapter
    from loratools.onnx.patch import merge_onnx

    t = tiny("gpt2")
    folder = t.export("slots-fp16", lora_slots=t.adapter, dtype="fp16")
    save_adapter(load_adapter(t.adapter), tmp_path / "a.onnx_adapter", format="onnx-adapter", model=folder)
    feed = t.feed()
    with_adapter = run(folder, feed, tmp_path / "a.onnx_adapter")
    assert with_adapter.dtype == np.float16
    ref = models.outputs(t.peft, feed).numpy()
    scale = float(np.abs(ref).max())
    assert np.abs(with_adapter.astype(np.float32) - ref).max() <= 2e-2 * max(1.0, scale)
    merge_onnx(folder, [t.adapter], tmp_path / "merged")  # the slots stay, at zero rank
    merged = run(tmp_path / "merged", feed).astype(np.float32)
    assert np.abs(merged - with_adapter.astype(np.float32)).max() <= 2e-2 * max(1.0, scale)
    assert np.abs(merged - run(folder, feed).astype(np.float32)).max() > 1e-1
