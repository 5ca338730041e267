"""validate on family adapters: NaN/Inf named, config against tensors, identity updates, fit to a base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from families_support import FAMILIES, LLAMA
from safetensors.torch import load_file, save_file

from loratools import validate


def _copy(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(FAMILIES / name, out)
    return out


def test_clean_family_adapters_validate_against_their_base():
    for name in ("peft-loha", "peft-lokr", "peft-oft", "peft-boft", "peft-ia3"):
        r = validate(FAMILIES / name, base=LLAMA)
        assert r.ok and not r.findings, (name, r.findings)


def test_nan_in_a_family_tensor_is_named(tmp_path: Path):
    a = _copy("peft-lokr", tmp_path)
    f = a / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("lokr_w2_b"))
    sd[key][0, 0] = float("nan")
    save_file(sd, str(f))
    r = validate(a)
    assert not r.ok and any(key in (x.message + str(x.tensor)) for x in r.findings)


def test_config_disagreeing_with_loha_tensors(tmp_path: Path):
    a = _copy("peft-loha", tmp_path)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    r = validate(a)
    assert [f.code for f in r.findings if f.severity == "error"][:1] == ["config_rank"]


def test_identity_oft_is_a_warning(tmp_path: Path):
    a = _copy("peft-oft", tmp_path)
    f = a / "adapter_model.safetensors"
    sd = {k: v * 0 for k, v in load_file(str(f)).items()}
    save_file(sd, str(f))
    r = validate(a)
    assert r.ok and {x.code for x in r.findings} == {"zero_delta"}


def test_family_against_bases(tmp_path: Path):
    assert validate(FAMILIES / "lycoris-loha.safetensors", base=FAMILIES / "tiny-unet").ok
    assert not validate(FAMILIES / "peft-boft", base=LLAMA.parent / "bert").ok  # not the model it was trained on


def test_negative_alpha_warned_where_it_scales(tmp_path) -> None:
    """LoHa multiplies by alpha/r: a negative alpha subtracts the update (said). LyCORIS' LoKr of two full halves
    ignores alpha (scale 1): nothing to say."""
    import torch

    for fixture, warned in (("lycoris-loha.safetensors", True), ("lycoris-lokr-full.safetensors", False)):
        tensors = load_file(FAMILIES / fixture)
        key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
        tensors[key] = torch.tensor(-4.0)
        save_file(tensors, tmp_path / fixture)
        codes = [f.code for f in validate(tmp_path / fixture).findings]
        assert ("negative_alpha" in codes) is warned, (fixture, codes)
