"""``convert --as-lora``: lossless lowering checked in PEFT itself, truncation against a dense fp64 Eckart–Young."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from families_support import FAMILIES, LLAMA, ROOT, UNET, lycoris_model, unet_input

from loratools import load_adapter
from loratools.ops.convert import convert

PEFT = ROOT / "fixtures" / "peft"


def _peft_logits(llama, path: Path) -> torch.Tensor:
    from models import outputs, sample_inputs
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(llama), str(path)).eval()
    return outputs(pm, sample_inputs())


@pytest.mark.parametrize(
    "src",
    [
        FAMILIES / "peft-loha",
        FAMILIES / "peft-lokr",
        FAMILIES / "peft-lokr-full",
        FAMILIES / "peft-oft",
        FAMILIES / "peft-boft",
        FAMILIES / "peft-ia3",
        PEFT / "llama-dora",
        PEFT / "llama-mts",
    ],
    ids=lambda p: p.name,
)
def test_lossless_lowering_equals_the_adapter_in_peft(src, tmp_path: Path, llama, peft_merged):
    from models import outputs, sample_inputs

    out = tmp_path / "lora"
    result = convert(src, "peft", out, base=LLAMA, as_lora=True)
    lowered = load_adapter(out)
    assert lowered.families() == {"lora"} and not lowered.replacements
    assert all(m.magnitude is None for m in lowered.modules.values())
    assert result.lowered["max_relative_error"] < 1e-9
    ref = peft_merged[src.name][1] if src.name in peft_merged else _peft_logits(llama, src)
    assert float((ref - outputs(llama, sample_inputs())).abs().max()) > 1e-2
    torch.testing.assert_close(_peft_logits(llama, out), ref, atol=1e-4, rtol=0)


def test_additive_families_lower_without_the_base(tmp_path: Path):
    result = convert(FAMILIES / "peft-loha", "peft", tmp_path / "l", as_lora=True)
    assert {m["source"] for m in result.lowered["modules"]} == {"factors"}
    loha, low = load_adapter(FAMILIES / "peft-loha"), load_adapter(tmp_path / "l")
    for name, m in loha.modules.items():
        assert low.modules[name].rank <= m.rank * m.rank2
        torch.testing.assert_close(low.modules[name].delta(), m.delta(), atol=1e-6, rtol=0)


def _exact_delta(m, w):
    from loratools.families.dense import delta_matrix

    return delta_matrix(m, w)


@pytest.mark.parametrize(
    ("name", "rule"),
    [("peft-loha", {"rank": 3}), ("peft-lokr", {"rank": 2}), ("peft-oft", {"rank": 8}), ("peft-ia3", {"fro": 0.9})],
)
def test_truncation_is_within_one_percent_of_eckart_young(name, rule, tmp_path: Path, llama_state):
    result = convert(FAMILIES / name, "peft", tmp_path / "t", base=LLAMA, as_lora=True, **rule)
    src, low = load_adapter(FAMILIES / name), load_adapter(tmp_path / "t")
    reported = {m["name"]: m for m in result.lowered["modules"]}
    for mod, m in src.modules.items():
        w = llama_state[mod + ".weight"]
        d = _exact_delta(m, w)
        s = torch.linalg.svdvals(d)
        k = low.modules[mod].rank
        optimum = math.sqrt(float((s[k:] ** 2).sum())) / float(d.norm())
        got = float((low.modules[mod].delta().double() - d).norm()) / float(d.norm())
        assert got <= 1.01 * optimum + 1e-7, (mod, got, optimum)
        assert reported[mod]["relative_error"] == pytest.approx(got, rel=1e-3, abs=1e-6)
        if "rank" in rule:
            assert k <= rule["rank"]
        else:
            assert 1 - optimum**2 >= rule["fro"] ** 2 - 1e-9


def test_lycoris_lokr_lowered_to_kohya_merges_like_lycoris(tmp_path: Path):
    from lycoris_family_models import tiny_unet
    from safetensors.torch import load_file

    from loratools import merge

    fname = "lycoris-lokr.safetensors"
    convert(FAMILIES / fname, "kohya", tmp_path / "l.safetensors", base=UNET, as_lora=True)
    merge(UNET, [tmp_path / "l.safetensors"], tmp_path / "m")
    model = tiny_unet()
    model.load_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")))
    x = unet_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), lycoris_model(fname)(x), atol=1e-5, rtol=0)


def test_w_dependent_families_need_the_base(tmp_path: Path):
    from loratools.errors import UsageError

    with pytest.raises(UsageError, match="depends on the base weight"):
        convert(FAMILIES / "peft-oft", "peft", tmp_path / "x", as_lora=True)
