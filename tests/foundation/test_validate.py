"""validate: findings on broken inputs, built from the fixtures in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from foundation_support import ADAPTERS, adapter_dir, base_dir
from safetensors.torch import load_file, save_file

from loratools import validate

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"


def broken(tmp_path: Path, edit=None, config=None, name: str = "llama-lora") -> Path:
    """A copy of a fixture adapter with its tensors (``edit(dict)``) and/or config (``config(dict)``) changed."""
    out = tmp_path / f"broken-{name}"
    shutil.copytree(adapter_dir(name), out)
    if edit is not None:
        f = out / "adapter_model.safetensors"
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        config(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def codes(report) -> list[str]:
    return [f.code for f in report.findings]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_fixtures_are_clean(name: str) -> None:
    report = validate(adapter_dir(name), base=base_dir(ADAPTERS[name]))
    assert report.ok and report.findings == [] and report.exit_code == 0
    assert report.modules_checked > 0


def test_missing_b_every_module_named(tmp_path) -> None:
    def drop(t):
        del t[f"{PREFIX}{Q0}.lora_B.weight"]
        del t[f"{PREFIX}model.layers.1.mlp.up_proj.lora_B.weight"]

    r = validate(broken(tmp_path, drop))
    assert not r.ok and r.usable and r.exit_code == 1
    assert codes(r) == ["missing_factor", "missing_factor"]
    assert {f.module for f in r.findings} == {Q0, "model.layers.1.mlp.up_proj"}
    assert "lora_B" in r.findings[0].message


def test_rank_mismatch(tmp_path) -> None:
    def shrink(t):
        t[f"{PREFIX}{Q0}.lora_B.weight"] = t[f"{PREFIX}{Q0}.lora_B.weight"][:, :3].contiguous()

    r = validate(broken(tmp_path, shrink))
    assert codes(r) == ["rank_mismatch"] and r.findings[0].module == Q0 and r.exit_code == 1
    assert "rank 4" in r.findings[0].message and "rank 3" in r.findings[0].message


def test_nan_names_file_tensor_and_index(tmp_path) -> None:
    key = f"{PREFIX}{Q0}.lora_A.weight"

    def poison(t):
        t[key][1, 5] = float("nan")
        t[key][2, 0] = float("inf")

    r = validate(broken(tmp_path, poison))
    assert codes(r) == ["nonfinite"] and r.exit_code == 1
    f = r.findings[0]
    assert f.module == Q0 and f.tensor == key and f.index == [1, 5]
    assert f.file.endswith("adapter_model.safetensors") and "2 NaN/Inf" in f.message


def test_config_rank_disagrees(tmp_path) -> None:
    r = validate(broken(tmp_path, config=lambda c: c.update(r=8)))
    assert set(codes(r)) == {"config_rank"} and len(r.findings) == 8 and r.exit_code == 1
    r = validate(broken(tmp_path, config=lambda c: c["rank_pattern"].update({"v_proj": 3}), name="llama-patterns"))
    assert {f.module for f in r.findings} == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}


def test_config_warnings(tmp_path) -> None:
    def cfg(c):
        c["target_modules"] = ["q_proj", "v_proj", "up_proj"]
        c["alpha_pattern"] = {"nothing_here": 2}

    r = validate(broken(tmp_path, config=cfg))
    assert r.ok and r.exit_code == 0  # warnings do not fail
    assert sorted(set(codes(r))) == ["not_targeted", "unused_pattern"]


def test_non_float_factor(tmp_path) -> None:
    def to_int(t):
        t[f"{PREFIX}{Q0}.lora_A.weight"] = (t[f"{PREFIX}{Q0}.lora_A.weight"] * 100).to(torch.int8)

    r = validate(broken(tmp_path, to_int))
    assert codes(r) == ["dtype"] and r.findings[0].module == Q0


def test_negative_alpha_is_a_warning(tmp_path) -> None:
    """Read as it is (the update subtracted: sd-scripts, ComfyUI and PEFT multiply by it), but said."""
    tensors = {"lora_unet_a_b.lora_down.weight": torch.randn(2, 8), "lora_unet_a_b.lora_up.weight": torch.randn(8, 2)}
    save_file({**tensors, "lora_unet_a_b.alpha": torch.tensor(-4.0)}, tmp_path / "neg.safetensors")
    r = validate(tmp_path / "neg.safetensors")
    assert codes(r) == ["negative_alpha"] and r.ok and "alpha is -4" in r.findings[0].message
    assert "--weights -1" in r.findings[0].hint
    save_file({**tensors, "lora_unet_a_b.alpha": torch.tensor(4.0)}, tmp_path / "pos.safetensors")
    assert codes(validate(tmp_path / "pos.safetensors")) == []


def test_zero_b_is_a_warning(tmp_path) -> None:
    r = validate(broken(tmp_path, lambda t: t[f"{PREFIX}{Q0}.lora_B.weight"].zero_()))
    assert codes(r) == ["zero_delta"] and r.ok


def test_wrong_shape_vs_base(tmp_path) -> None:
    import models

    models.save_base(models.build_model("llama", intermediate_size=40), tmp_path / "base40")
    r = validate(adapter_dir("llama-lora"), base=tmp_path / "base40")
    assert set(codes(r)) == {"shape_mismatch", "base_mismatch"} and r.exit_code == 1
    assert r.findings[0].code == "base_mismatch" and r.findings[0].message.endswith("intermediate_size 48 vs 40")
    mlp = {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("up_proj", "down_proj")}
    assert {f.module for f in r.findings[1:]} == mlp
    assert "[48, 32]" in r.findings[-1].message or "[32, 48]" in r.findings[-1].message


def test_quantized_base(tmp_path) -> None:
    q = tmp_path / "q"
    shutil.copytree(base_dir("llama"), q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (q / "config.json").write_text(json.dumps(cfg))
    r = validate(adapter_dir("llama-lora"), base=q)
    assert codes(r) == ["base_quantized"] and "gptq" in r.findings[0].message and r.exit_code == 1

    # int8 weights where a module points (packed without a config)
    q8 = tmp_path / "q8"
    shutil.copytree(base_dir("llama"), q8)
    st = load_file(q8 / "model.safetensors")
    st[f"{Q0}.weight"] = (st[f"{Q0}.weight"] * 1000).to(torch.int8)
    save_file(st, q8 / "model.safetensors", metadata={"format": "pt"})
    r = validate(adapter_dir("llama-lora"), base=q8)
    assert codes(r) == ["base_not_float"] and r.findings[0].module == Q0


def test_unusable_inputs_are_reported(tmp_path) -> None:
    r = validate(tmp_path / "missing")
    assert not r.usable and r.exit_code == 2 and codes(r) == ["unreadable"]
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text('{"peft_type": "VERA"}')  # IA3 is read now; VeRA is not
    r = validate(ia3)
    assert codes(r) == ["unsupported_type"] and "VERA" in r.findings[0].message and r.exit_code == 2
    r = validate(adapter_dir("llama-lora"), base=tmp_path / "nobase")
    assert codes(r) == ["base_unreadable"] and r.exit_code == 2
    trunc = broken(tmp_path)
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    r = validate(trunc)
    assert codes(r) == ["unreadable"] and "not a valid safetensors file" in r.findings[0].message


def test_report_dict() -> None:
    d = validate(adapter_dir("llama-lora")).to_dict()
    assert d == {
        "path": str(adapter_dir("llama-lora")),
        "format": "peft",
        "base": None,
        "ok": True,
        "usable": True,
        "modules_checked": 8,
        "errors": 0,
        "warnings": 0,
        "findings": [],
    }


def test_structure_problems_and_nan_reported_together(tmp_path) -> None:
    def both(t):
        t[f"{PREFIX}{Q0}.lora_A.weight"][0, 0] = float("inf")
        del t[f"{PREFIX}model.layers.1.mlp.up_proj.lora_B.weight"]

    r = validate(broken(tmp_path, both))
    assert codes(r) == ["missing_factor", "nonfinite"] and r.exit_code == 1
    assert r.findings[1].module == Q0 and r.findings[1].index == [0, 0]


def test_magnitude_bias_and_unknown_tensors(tmp_path) -> None:
    def bad(t):
        t[f"{PREFIX}{Q0}.lora_magnitude_vector"] = t[f"{PREFIX}{Q0}.lora_magnitude_vector"][:5].clone()
        t[f"{PREFIX}{Q0}.lora_C.weight"] = torch.ones(2, 2)

    r = validate(broken(tmp_path, bad, name="llama-dora"))
    assert sorted(codes(r)) == ["magnitude_shape", "unknown_tensor"]


def test_file_inside_a_peft_folder_is_the_folder() -> None:
    from loratools import load_adapter

    for name in ("adapter_model.safetensors", "adapter_config.json"):
        a = load_adapter(adapter_dir("llama-lora") / name)
        assert a.format == "peft" and len(a.modules) == 8
    assert validate(adapter_dir("llama-bin") / "adapter_model.bin").ok
