"""verify passes correct merges (ours and PEFT's) and names the defect of merges broken on purpose."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from merge_support import make_case
from safetensors.torch import save_file

from loratools import merge, verify
from loratools.cli.main import main
from loratools.files.safetensors_file import load_file

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def case(tmp_module: Path):
    c = make_case(tmp_module / "case", "llama", peft_kw={"target_modules": ["q_proj", "v_proj", "down_proj"]})
    merge(c.base, [c.adapter], tmp_module / "ours")
    return c


def _delta(case, module: str) -> torch.Tensor:
    layer = case.peft.get_submodule(f"base_model.model.{module}")
    return layer.get_delta_weight("default").detach()


def _broken(tmp: Path, case, name: str, edit) -> Path:  # noqa: ANN001
    src = tmp / "ours"
    tensors = load_file(src / "model.safetensors")[0]
    edit(tensors)
    out = tmp / name
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_verify_passes_our_merge(case, tmp_module: Path) -> None:
    report = verify(tmp_module / "ours", case.base, [case.adapter])
    assert report.verified, report.summary()
    assert report.modules_checked == 6


def test_verify_passes_peft_merge(case, tmp_module: Path) -> None:
    merged = copy.deepcopy(case.peft).merge_and_unload()
    merged.save_pretrained(str(tmp_module / "peft"))
    report = verify(tmp_module / "peft", case.base, [case.adapter])
    assert report.verified, report.summary()


@pytest.mark.parametrize(
    "defect,status",
    [
        ("skipped", "not_applied"),
        ("doubled", "scaling_mismatch"),
        ("flipped", "sign_flipped"),
        ("transposed", "transposed"),
        ("partial", "partial_rank"),
        ("untouched", "untouched_changed"),
        ("rounded", "wrong_update"),
    ],
)
def test_verify_names_defects(case, tmp_module: Path, defect: str, status: str) -> None:
    base = load_file(case.base / "model.safetensors")[0]
    w, d = base[f"{Q}.weight"], _delta(case, Q)
    layer = case.peft.get_submodule(f"base_model.model.{Q}")
    b, a = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
    edits = {
        "skipped": lambda t: t.__setitem__(f"{Q}.weight", w.clone()),
        "doubled": lambda t: t.__setitem__(f"{Q}.weight", w + 2 * d),
        "flipped": lambda t: t.__setitem__(f"{Q}.weight", w - d),
        "transposed": lambda t: t.__setitem__(f"{Q}.weight", w + d.T),
        "partial": lambda t: t.__setitem__(f"{Q}.weight", w + layer.scaling["default"] * b[:, :2] @ a[:2]),
        "untouched": lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"] + 0.01),
        # merged from bf16 copies of the factors: right scale, wrong by far more than fp32 rounding
        "rounded": lambda t: t.__setitem__(
            f"{Q}.weight", w + layer.scaling["default"] * b.bfloat16().float() @ a.bfloat16().float()
        ),
    }
    out = _broken(tmp_module, case, defect, edits[defect])
    report = verify(out, case.base, [case.adapter])
    assert not report.verified
    assert [f.status for f in report.failures] == [status], report.summary()
    if defect == "doubled":
        assert report.failures[0].ratio == pytest.approx(2.0, rel=1e-3)
    if defect == "rounded":  # was "scaling mismatch (ratio 1)": a contradiction
        assert "direction and scale" in report.failures[0].detail, report.summary()


def test_verify_catches_peft_tied_lm_head(tmp_path: Path) -> None:
    c = make_case(tmp_path, "llama", model_kw={"tie_word_embeddings": True}, peft_kw={"target_modules": ["lm_head"]})
    copy.deepcopy(c.peft).merge_and_unload().save_pretrained(str(tmp_path / "peft"))
    report = verify(tmp_path / "peft", c.base, [c.adapter])
    assert [f.status for f in report.failures] == ["tied_weight_changed"], report.summary()
    merge(c.base, [c.adapter], tmp_path / "ours", verify=True)
    assert verify(tmp_path / "ours", c.base, [c.adapter]).verified


def test_verify_below_precision(tmp_path: Path) -> None:
    def shrink(p) -> None:  # noqa: ANN001
        with torch.no_grad():
            for n, t in p.named_parameters():
                if "lora_B" in n:
                    t.mul_(1e-7)

    c = make_case(tmp_path, "llama", base_kw={"dtype": torch.bfloat16}, mutate=shrink)
    merge(c.base, [c.adapter], tmp_path / "ours")
    report = verify(tmp_path / "ours", c.base, [c.adapter])
    assert report.failures and {f.status for f in report.failures} == {"below_precision"}


def test_verify_cli_json_and_exit_codes(case, tmp_module: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    with pytest.raises(SystemExit) as ok:
        main(["verify", str(tmp_module / "ours"), "--base", str(case.base), "--adapter", str(case.adapter), "--json"])
    assert ok.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True and doc["schema_version"] == 1
    bad = tmp_module / "skipped" if (tmp_module / "skipped").exists() else None
    if bad is None:
        base = load_file(case.base / "model.safetensors")[0]
        bad = _broken(tmp_module, case, "skipped-cli", lambda t: t.__setitem__(f"{Q}.weight", base[f"{Q}.weight"]))
    with pytest.raises(SystemExit) as failed:
        main(["verify", str(bad), "--base", str(case.base), "--adapter", str(case.adapter)])
    assert failed.value.code == 1
    assert "not applied" in capsys.readouterr().out
