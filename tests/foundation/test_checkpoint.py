"""The checkpoint reader (single, sharded, .bin, one file) and module-path -> base-key matching."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from foundation_support import base_dir, load_base

from loratools import open_checkpoint
from loratools.checkpoint.keymap import KeyMatcher, resolve_modules
from loratools.errors import FormatError, InputNotFoundError


@pytest.fixture(scope="module")
def llama_state() -> dict[str, torch.Tensor]:
    return load_base("llama").state_dict()


def _assert_same(reader, state: dict[str, torch.Tensor]) -> None:
    keys = set(reader.keys())
    assert keys and keys <= set(state)
    for k in keys:
        assert reader.info(k).shape == tuple(state[k].shape)
        assert torch.equal(reader.get(k).to(state[k].dtype), state[k]), k


def test_single_folder(llama_state) -> None:
    with open_checkpoint(base_dir("llama")) as r:
        assert len(r.files) == 1 and r.config["model_type"] == "llama"
        _assert_same(r, llama_state)


def test_sharded_folder(llama_state) -> None:
    with open_checkpoint(base_dir("llama-sharded")) as r:
        assert len(r.files) == 2 and r.index is not None
        _assert_same(r, llama_state)
        assert {r.file_of(k).name for k in r.keys()} == {f.name for f in r.files}


def test_single_safetensors_file(llama_state) -> None:
    with open_checkpoint(base_dir("llama") / "model.safetensors") as r:
        assert r.kind == "file" and r.config is None
        _assert_same(r, llama_state)


def test_bf16_folder(llama_state) -> None:
    with open_checkpoint(base_dir("llama-bf16")) as r:
        k = "model.layers.0.self_attn.q_proj.weight"
        assert r.info(k).dtype == "BF16"
        assert torch.equal(r.get(k), llama_state[k].to(torch.bfloat16))


def test_bin_folder_and_file(tmp_path, llama_state) -> None:
    # transformers 5 writes safetensors even when asked for .bin: write the pickle the old way
    (tmp_path / "bin").mkdir()
    shutil.copy(base_dir("llama") / "config.json", tmp_path / "bin")
    torch.save(llama_state, tmp_path / "bin" / "pytorch_model.bin")
    with open_checkpoint(tmp_path / "bin") as r:
        assert r.files[0].suffix == ".bin"
        _assert_same(r, llama_state)
    with open_checkpoint(r.files[0]) as r2:
        _assert_same(r2, llama_state)


def test_reader_errors(tmp_path) -> None:
    with pytest.raises(InputNotFoundError):
        open_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="no model weights"):
        open_checkpoint(tmp_path / "empty")
    broken = tmp_path / "sharded"
    shutil.copytree(base_dir("llama-sharded"), broken)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(InputNotFoundError, match="is missing"):
        open_checkpoint(broken)


def test_quantization_detected(tmp_path) -> None:
    q = tmp_path / "q"
    shutil.copytree(base_dir("llama"), q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    with open_checkpoint(q) as r:
        assert r.quantization == "bitsandbytes"
    with open_checkpoint(base_dir("llama")) as r:
        assert r.quantization is None


def test_keymap_bert_prefix() -> None:
    """An adapter trained on BertFor* names ``bert.encoder...``; a BertModel base has ``encoder...``."""
    with open_checkpoint(base_dir("bert")) as r:
        keys = r.keys()
        names = ["bert.encoder.layer.0.attention.self.query", "encoder.layer.1.intermediate.dense", "bert.pooler.nope"]
        mapping, unmatched = resolve_modules(names, r)
    assert mapping == {
        "bert.encoder.layer.0.attention.self.query": "encoder.layer.0.attention.self.query",
        "encoder.layer.1.intermediate.dense": "encoder.layer.1.intermediate.dense",
    }
    assert unmatched == ["bert.pooler.nope"]
    # and the reverse: adapter without the prefix, base with it
    m = KeyMatcher(["bert." + k for k in keys])
    assert m.module("encoder.layer.0.attention.self.query") == "bert.encoder.layer.0.attention.self.query"


def test_load_adapter_with_base_normalizes_names() -> None:
    from foundation_support import adapter_dir

    from loratools import load_adapter

    a = load_adapter(adapter_dir("bert-lora"), base=base_dir("bert"))
    assert a.meta["unresolved"] == []
    assert "encoder.layer.0.attention.self.query" in a.modules
