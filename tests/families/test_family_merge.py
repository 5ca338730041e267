"""Merging family adapters: merged models against PEFT's unmerged PeftModel and LyCORIS' own forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families_support import FAMILIES, LLAMA, PEFT_FIXTURES, UNET, lycoris_model, unet_input

from loratools import load_adapter, merge
from loratools.errors import UnsupportedError

ROOT = Path(__file__).resolve().parents[2]


def _logits(path: Path) -> torch.Tensor:
    from models import outputs, sample_inputs
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return outputs(model, sample_inputs())


@pytest.fixture(scope="module")
def base_logits():
    return _logits(LLAMA)


@pytest.mark.parametrize("name", PEFT_FIXTURES)
def test_merged_model_equals_unmerged_peft(name, tmp_path: Path, peft_merged, base_logits):
    out = merge(LLAMA, [FAMILIES / name], tmp_path / "m")
    assert out.modules_merged == len(load_adapter(FAMILIES / name).modules)
    ref = peft_merged[name][1]
    assert float((ref - base_logits).abs().max()) > 1e-2  # the adapter moves the logits far past the tolerance
    torch.testing.assert_close(_logits(tmp_path / "m"), ref, atol=1e-5, rtol=0)


def test_additive_families_mix_with_lora_and_take_weights(tmp_path: Path, llama_state):
    from safetensors.torch import load_file

    loha, lora = FAMILIES / "peft-loha", ROOT / "fixtures" / "peft" / "llama-lora"
    merge(LLAMA, [loha, lora], tmp_path / "m", weights=[0.5, -1.0])
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    a, b = load_adapter(loha), load_adapter(lora)
    for key in {*a.modules, *b.modules}:
        want = llama_state[key + ".weight"].clone()
        if key in a.modules:
            want += 0.5 * a.modules[key].delta()
        if key in b.modules:
            want -= b.modules[key].delta()
        torch.testing.assert_close(got[key + ".weight"], want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["peft-oft", "peft-ia3", "peft-boft"])
def test_multiplicative_families_refuse_weights(name, tmp_path: Path):
    with pytest.raises(UnsupportedError, match="multiplies the weight"):
        merge(LLAMA, [FAMILIES / name], tmp_path / "m", weights=[0.5])
    assert not (tmp_path / "m").exists()


def test_multiplicative_family_refuses_sharing_a_tensor(tmp_path: Path):
    with pytest.raises(UnsupportedError, match="depend on their order"):
        merge(LLAMA, [FAMILIES / "peft-oft", ROOT / "fixtures" / "peft" / "llama-lora"], tmp_path / "m")


@pytest.mark.parametrize(
    "fname",
    [
        "lycoris-loha.safetensors",
        "lycoris-lokr-dora-in.safetensors",
        "lycoris-oft.safetensors",
        "lycoris-loha-tucker.safetensors",
    ],
)
def test_lycoris_merge_equals_lycoris_forward(fname, tmp_path: Path):
    from lycoris_family_models import tiny_unet
    from safetensors.torch import load_file

    merge(UNET, [FAMILIES / fname], tmp_path / "m")
    model = tiny_unet()
    model.load_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")))
    x = unet_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), lycoris_model(fname)(x), atol=1e-5, rtol=0)


def test_verify_understands_families(tmp_path: Path):
    from loratools.ops.verify import verify

    merge(LLAMA, [FAMILIES / "peft-oft"], tmp_path / "m")
    assert verify(tmp_path / "m", LLAMA, [FAMILIES / "peft-oft"]).verified
    wrong = verify(tmp_path / "m", LLAMA, [FAMILIES / "peft-ia3"])
    assert not wrong.verified
    assert any("(IA)³-merged weight does not match" in f.detail for f in wrong.findings)
