"""PEFT loads every adapter our writer produces onto exactly the modules it holds: no module more (a
widened ``target_modules`` makes PEFT wrap modules the file has no tensors for and warn about missing
keys), no module less, and no key left unused."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import models
import pytest
import torch
from foundation_support import ADAPTERS, FIXTURES, load_base

from loratools import load_adapter, resize, save_adapter

PEFT_FIXTURES = sorted(p.name for p in (FIXTURES / "peft").iterdir() if (p / "adapter_config.json").is_file())


def _kind(folder: Path) -> str:
    name = folder.name
    return ADAPTERS.get(name) or name.split("-", 1)[0]


def load_clean(folder: Path, kind: str, caplog: pytest.LogCaptureFixture):
    """PeftModel.from_pretrained of ``folder``; fails on any missing/unexpected-key warning or log line."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = load_base(kind)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(folder)).eval()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    bad = [s for s in said if "missing" in s.lower() or "unexpected" in s.lower()]
    assert not bad, bad
    wrapped = {n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    return model, wrapped


@pytest.mark.parametrize("name", PEFT_FIXTURES)
def test_every_fixture_round_trips_onto_exactly_its_modules(name: str, tmp_path, caplog) -> None:
    adapter = load_adapter(FIXTURES / "peft" / name)
    save_adapter(adapter, tmp_path / "w")
    _, wrapped = load_clean(tmp_path / "w", _kind(FIXTURES / "peft" / name), caplog)
    assert wrapped == set(adapter.modules)


def test_bert_intermediate_dense_only(tmp_path, caplog) -> None:
    """``intermediate.dense`` must not become ``dense`` (that also wraps attention.output.dense, output.dense)."""
    base = models.build_model("bert")
    pm = models.make_peft(base, tmp_path / "src", kind="bert", target_modules=["intermediate.dense"], r=2, lora_alpha=3)
    inputs = models.sample_inputs()
    want = models.outputs(pm, inputs)
    assert (want - models.outputs(base, inputs)).abs().max() > 1e-3
    adapter = load_adapter(tmp_path / "src")
    assert set(adapter.modules) == {f"encoder.layer.{i}.intermediate.dense" for i in range(2)}
    save_adapter(adapter, tmp_path / "w")
    model, wrapped = load_clean(tmp_path / "w", "bert", caplog)
    assert wrapped == set(adapter.modules)
    torch.testing.assert_close(models.outputs(model, inputs), want, rtol=1e-5, atol=1e-5)


def test_resize_that_drops_a_module_drops_its_target(tmp_path, caplog) -> None:
    """A module resized to rank 0 is neither written nor targeted (PEFT would wrap it and miss its keys)."""
    from safetensors.torch import load_file, save_file

    models.make_peft(models.build_model("llama"), tmp_path / "src", kind="llama", r=4, lora_alpha=7)
    st = tmp_path / "src" / "adapter_model.safetensors"
    tensors = load_file(st)
    dead = "model.layers.0.self_attn.q_proj"
    tensors[f"base_model.model.{dead}.lora_B.weight"].zero_()
    save_file(tensors, st, metadata={"format": "pt"})

    result = resize(tmp_path / "src", rank=2, output=tmp_path / "small")
    assert result.dropped == [dead]
    _, wrapped = load_clean(tmp_path / "small", "llama", caplog)
    assert dead not in wrapped
    assert wrapped == set(load_adapter(tmp_path / "small").modules)
