"""Our PEFT writer's output loads with ``PeftModel.from_pretrained`` and gives the original outputs."""

from __future__ import annotations

import json
from pathlib import Path

import models
import pytest
import torch
from foundation_support import ADAPTERS, adapter_dir, load_base, load_peft

from loratools import load_adapter, save_adapter
from loratools.files.safetensors_file import read_header
from loratools.publishing.publish import provenance, read_provenance

INPUTS = {"llama": models.sample_inputs(), "gpt2": models.sample_inputs(), "bert": models.sample_inputs()}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_written_adapter_loads_in_peft_with_same_outputs(name: str, tmp_path) -> None:
    kind = ADAPTERS[name]
    inputs = INPUTS[kind]
    original = models.outputs(load_peft(adapter_dir(name), kind), inputs)
    base_out = models.outputs(load_base(kind), inputs)
    assert (original - base_out).abs().max() > 1e-3, "the adapter must change the outputs"

    out = tmp_path / "written"
    record = provenance("test-roundtrip", {"name": name}, {})
    save_adapter(load_adapter(adapter_dir(name)), out, provenance=record)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    _, meta = read_header(out / "adapter_model.safetensors")
    assert read_provenance(meta)["operation"] == "test-roundtrip"

    again = models.outputs(load_peft(out, kind), inputs)
    torch.testing.assert_close(again, original, rtol=1e-5, atol=1e-5)


def test_reread_is_identical(tmp_path) -> None:
    for name in ("llama-patterns", "llama-dora", "llama-embed", "gpt2-lora"):
        a = load_adapter(adapter_dir(name))
        save_adapter(a, tmp_path / name)
        b = load_adapter(tmp_path / name)
        assert set(a.modules) == set(b.modules) and set(a.replacements) == set(b.replacements)
        for k, m in a.modules.items():
            n = b.modules[k]
            assert (m.rank, m.alpha, m.kind, m.fan_in_fan_out, m.use_rslora) == (
                n.rank,
                n.alpha,
                n.kind,
                n.fan_in_fan_out,
                n.use_rslora,
            )
            assert torch.equal(m.down, n.down) and torch.equal(m.up, n.up)


def test_written_config_is_plain_peft(tmp_path) -> None:
    adapter = load_adapter(adapter_dir("llama-patterns"))
    save_adapter(adapter, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 7
    assert cfg["init_lora_weights"] is True  # layers PEFT creates but the file lacks start as a zero delta
    own = json.loads((adapter_dir("llama-patterns") / "adapter_config.json").read_text())["target_modules"]
    assert cfg["target_modules"] == own  # the same modules: the user's own names are kept (issue 19.4)
    save_adapter(adapter.select(exclude=r"\.0\.self_attn\.q_proj$"), tmp_path / "fewer")
    cfg = json.loads((tmp_path / "fewer" / "adapter_config.json").read_text())
    leaves = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
    paths = sorted(f"model.layers.{i}.{leaf}" for i in range(2) for leaf in leaves)
    assert cfg["target_modules"] == [p for p in paths if p != "model.layers.0.self_attn.q_proj"]  # exact paths


def test_save_refuses_existing_output(tmp_path) -> None:
    from loratools.errors import OutputExistsError

    a = load_adapter(adapter_dir("llama-lora"))
    save_adapter(a, tmp_path / "o")
    with pytest.raises(OutputExistsError):
        save_adapter(a, tmp_path / "o")
    save_adapter(a, tmp_path / "o", overwrite=True)


def test_output_path_must_fit_the_format_layout(tmp_path) -> None:
    """A one-file format given a folder path, or a folder format given a file name, is refused up front."""
    from loratools.errors import UsageError
    from loratools.formats.adapter_io import load_adapter, save_adapter

    adapter = load_adapter(Path(__file__).resolve().parents[2] / "fixtures" / "peft" / "llama-lora")
    with pytest.raises(UsageError, match="writes a folder"):
        save_adapter(adapter, tmp_path / "out.safetensors", format="peft")
    with pytest.raises(UsageError, match="writes one file"):
        save_adapter(adapter, f"{tmp_path}/kdir/", format="kohya", kohya_prefix="lora_llm_")
    assert not any(tmp_path.iterdir())
