"""Reading PEFT and LyCORIS family adapters: our ΔW against the peers' own maths, and lossless write-back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families_support import FAMILIES, LYCORIS_FIXTURES, PEFT_FIXTURES, UNET, lycoris_model, unet_input

from loratools import load_adapter, save_adapter
from loratools.families import FamilyModule


@pytest.mark.parametrize("name", PEFT_FIXTURES)
def test_peft_delta_equals_peft_merge(name, llama_state, peft_merged):
    adapter = load_adapter(FAMILIES / name)
    merged, _ = peft_merged[name]
    assert adapter.modules and all(isinstance(m, FamilyModule) for m in adapter.modules.values())
    for mod, m in adapter.modules.items():
        w = llama_state[mod + ".weight"]
        ref = merged[mod + ".weight"]
        assert float((ref - w).abs().max()) > 1e-3  # the fixture really changes the weight
        ours = w + m.delta(w if m.needs_base else None).reshape(w.shape)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["peft-loha", "peft-lokr", "peft-lokr-full"])
def test_peft_additive_delta_equals_get_delta_weight(name, llama):
    import copy

    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(llama), str(FAMILIES / name)).eval()
    adapter = load_adapter(FAMILIES / name)
    layers = dict(pm.base_model.model.named_modules())
    for mod, m in adapter.modules.items():
        ref = layers[mod].get_delta_weight("default")
        torch.testing.assert_close(m.delta(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fname", LYCORIS_FIXTURES)
def test_lycoris_merged_equals_lycoris_forward(fname):
    from lycoris_family_models import tiny_unet
    from safetensors.torch import load_file

    x = unet_input()
    base = tiny_unet()
    with torch.no_grad():
        y0 = base(x)
        ref = lycoris_model(fname)(x)
    assert float((ref - y0).abs().max()) > 1e-2
    adapter = load_adapter(FAMILIES / fname, base=UNET)
    state = load_file(str(UNET / "model.safetensors"))
    for mod, m in adapter.modules.items():
        w = state[mod + ".weight"]
        state[mod + ".weight"] = m.merged(w).reshape(w.shape)
    base.load_state_dict(state)
    with torch.no_grad():
        ours = base(x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def _same(a, b) -> None:
    assert a.modules.keys() == b.modules.keys()
    for k, m in a.modules.items():
        n = b.modules[k]
        assert type(m) is type(n)
        assert m.tensors().keys() == n.tensors().keys()
        for part, t in m.tensors().items():
            assert torch.equal(t, n.tensors()[part]), (k, part)


@pytest.mark.parametrize("name", PEFT_FIXTURES + LYCORIS_FIXTURES)
def test_write_back_is_lossless(name, tmp_path: Path):
    src = FAMILIES / name
    adapter = load_adapter(src)
    fmt = "peft" if src.is_dir() else "kohya"
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    save_adapter(adapter, out, format=fmt)
    again = load_adapter(out)
    _same(adapter, again)
    for k, m in adapter.modules.items():
        n = again.modules[k]
        if not m.needs_base:
            torch.testing.assert_close(m.delta(), n.delta(), atol=0, rtol=0)


def test_written_peft_folder_loads_in_peft(tmp_path: Path, llama, peft_merged):
    import copy

    from models import outputs, sample_inputs
    from peft import PeftModel

    for name in ("peft-lokr", "peft-oft", "peft-ia3"):
        out = tmp_path / name
        save_adapter(load_adapter(FAMILIES / name), out, format="peft")
        pm = PeftModel.from_pretrained(copy.deepcopy(llama), str(out)).eval()
        torch.testing.assert_close(outputs(pm, sample_inputs()), peft_merged[name][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("peft_type", ["VERA", "FOURIERFT", "C3A", "ADALORA"])
def test_unhandled_peft_types_get_one_line(peft_type, tmp_path: Path):
    import json

    from loratools.errors import UnsupportedError

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedError, match=f"PEFT type {peft_type} is not one loratools reads"):
        load_adapter(tmp_path)
