"""The PEFT reader gives exactly what PEFT itself loads: deltas, magnitudes, biases, full tensors."""

from __future__ import annotations

import shutil

import pytest
import torch
from foundation_support import ADAPTERS, adapter_dir, base_dir, load_peft

from loratools import load_adapter


def peft_layers(pm) -> dict[str, torch.nn.Module]:
    """LoRA layers of a PeftModel by module path (no PEFT prefix)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_deltas_equal_peft(name: str) -> None:
    kind = ADAPTERS[name]
    adapter = load_adapter(adapter_dir(name))
    layers = peft_layers(load_peft(adapter_dir(name), kind))
    assert set(adapter.modules) == set(layers)
    for mod, layer in layers.items():
        m = adapter.modules[mod]
        expected = layer.get_delta_weight("default").float()
        got = m.delta()
        assert got.shape == expected.shape == layer.get_base_layer().weight.shape
        assert expected.abs().max() > 1e-3, f"{mod}: the fixture's delta is zero"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert m.scale == pytest.approx(layer.scaling["default"])
        if m.magnitude is not None:
            torch.testing.assert_close(m.magnitude.float(), layer.lora_magnitude_vector["default"].weight.float())
        else:
            assert not layer.use_dora.get("default", False)
        lora_b = layer.lora_B["default"] if "default" in layer.lora_B else None
        if m.bias is not None:
            torch.testing.assert_close(m.bias.float(), lora_b.bias.float())
        elif lora_b is not None:
            assert lora_b.bias is None


def test_variant_facts() -> None:
    rs = load_adapter(adapter_dir("llama-rslora"))
    m = next(iter(rs.modules.values()))
    assert m.use_rslora and m.scale == pytest.approx(5 / 6**0.5)
    pat = load_adapter(adapter_dir("llama-patterns")).modules
    assert pat["model.layers.0.self_attn.v_proj"].rank == 2
    assert pat["model.layers.1.mlp.down_proj"].rank == 6 and pat["model.layers.0.mlp.down_proj"].rank == 4
    assert pat["model.layers.0.self_attn.q_proj"].alpha == 11 and pat["model.layers.1.self_attn.q_proj"].alpha == 7
    assert pat["model.layers.1.mlp.up_proj"].alpha == 3
    emb = load_adapter(adapter_dir("llama-embed"))
    assert emb.modules["model.embed_tokens"].kind == "embedding"
    assert emb.modules["model.embed_tokens"].weight_shape == (96, 32)
    assert "model.embed_tokens.weight" in emb.replacements  # the saved base_layer
    mts = load_adapter(adapter_dir("llama-mts"))
    assert set(mts.replacements) == {"lm_head.weight"}
    assert load_adapter(adapter_dir("llama-bf16")).dtypes() == {torch.bfloat16}
    assert load_adapter(adapter_dir("llama-bin")).meta["files"][-1].endswith("adapter_model.bin")


def test_modules_to_save_and_base_layer_equal_peft() -> None:
    pm = load_peft(adapter_dir("llama-mts"), "llama")
    mts = load_adapter(adapter_dir("llama-mts"))
    saved = pm.base_model.model.lm_head.modules_to_save["default"].weight
    torch.testing.assert_close(mts.replacements["lm_head.weight"], saved)
    pe = load_peft(adapter_dir("llama-embed"), "llama")
    emb = load_adapter(adapter_dir("llama-embed"))
    torch.testing.assert_close(
        emb.replacements["model.embed_tokens.weight"], pe.base_model.model.model.embed_tokens.base_layer.weight
    )


def test_gpt2_conv1d_fan_in_fan_out(tmp_path) -> None:
    """GPT-2's Conv1D stores W as (in, out); c_proj is square, so only the flag (or the base) can tell."""
    a = load_adapter(adapter_dir("gpt2-lora"))
    assert all(m.fan_in_fan_out for m in a.modules.values())
    # a config whose flag says False (a mixed adapter, the last layer won): the base decides
    bad = tmp_path / "gpt2"
    shutil.copytree(adapter_dir("gpt2-lora"), bad)
    cfg = (bad / "adapter_config.json").read_text().replace('"fan_in_fan_out": true', '"fan_in_fan_out": false')
    (bad / "adapter_config.json").write_text(cfg)
    assert not any(m.fan_in_fan_out for m in load_adapter(bad).modules.values())
    fixed = load_adapter(bad, base=base_dir("gpt2"))
    assert all(m.fan_in_fan_out for m in fixed.modules.values())
    assert fixed.modules["transformer.h.0.attn.c_attn"].weight_shape == (32, 96)


def test_conv2d_matches_peft(tmp_path) -> None:
    """A tiny custom model with Conv2d (k=3) and DoRA: delta, magnitude and layout equal PEFT's."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3)
            self.fc = torch.nn.Linear(5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=3, target_modules=["conv", "fc"], init_lora_weights=False, use_dora=True)
    pm = get_peft_model(Net(), cfg)
    pm.save_pretrained(str(tmp_path / "net"))
    a = load_adapter(tmp_path / "net")
    conv = a.modules["conv"]
    assert conv.kind == "conv" and conv.weight_shape == (5, 3, 3, 3)
    layer = pm.base_model.model.conv
    torch.testing.assert_close(conv.delta(), layer.get_delta_weight("default"))
    assert conv.delta().abs().max() > 1e-3
    torch.testing.assert_close(conv.magnitude, layer.lora_magnitude_vector["default"].weight)


def test_bin_equals_safetensors(tmp_path) -> None:
    pm = load_peft(adapter_dir("llama-lora"), "llama")
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    a, b = load_adapter(adapter_dir("llama-lora")), load_adapter(tmp_path / "bin")
    assert set(a.modules) == set(b.modules)
    for k in a.modules:
        torch.testing.assert_close(a.modules[k].delta(), b.modules[k].delta(), rtol=0, atol=0)


def test_committed_fixtures_stay_small(fixtures_root) -> None:
    from foundation_support import ROOT

    committed = [p for p in fixtures_root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in committed) < 3_000_000, "keep committed fixtures to a few MB"
    assert (ROOT / "fixtures" / "make_fixtures.py").is_file()
