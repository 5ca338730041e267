"""kohya LoRAs merged into single-file SD1.5/SDXL checkpoints in the original (LDM/SGM) layout.

Oracles: (a) our merge into the same model as a diffusers pipeline, converted to the original layout by
sd-scripts' own conversion; (b) sd-scripts' ``merge_lora.py`` update loop on the same weights, converted
back by its own code (``kohya_oracle.py``, vendored test-only); (c) diffusers' own LDM -> diffusers
conversion (``diffusers.loaders.single_file_utils``) for the key table itself.
"""

from __future__ import annotations

from pathlib import Path

import ldm_support
import pytest
import torch
from safetensors.torch import load_file

from loratools import merge
from loratools.ldm_keymap import ldm_layout


def _ordinal(t: torch.Tensor) -> torch.Tensor:
    """fp16 values as integers in value order: neighbours differ by 1 (one ulp)."""
    bits = t.to(torch.float16).view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _compare(ours: dict, ref: dict, base: dict) -> tuple[int, int]:
    """Every tensor within 1 fp16 ulp of ``ref``; returns (tensors the LoRA changed, of them bit-equal)."""
    assert set(ours) == set(ref) == set(base)
    changed = equal = 0
    for k, b in base.items():
        assert ours[k].dtype == b.dtype and ours[k].shape == b.shape, k
        if torch.equal(ref[k], b):
            assert torch.equal(ours[k], b), f"{k}: untouched in the oracle, changed by us"
            continue
        changed += 1
        # parity: the LoRA moves this tensor far beyond the tolerance of the comparison
        assert float((ref[k].float() - b.float()).abs().max()) > 1e-2, k
        ulps = int((_ordinal(ours[k]) - _ordinal(ref[k])).abs().max())
        assert ulps <= 1, f"{k}: {ulps} fp16 ulps from the oracle"
        equal += int(torch.equal(ours[k], ref[k]))
    return changed, equal


@pytest.fixture(scope="module")
def merged_sd15(sd15: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "merged.safetensors"
    summary = merge(sd15["ldm"], [sd15["lora_path"]], out, verify=True)
    assert summary.verify is not None and summary.verify.verified
    return out


def test_sd15_equals_kohya_merge_lora(sd15: dict, merged_sd15: Path) -> None:
    ours, base = load_file(str(merged_sd15)), load_file(str(sd15["ldm"]))
    ref = ldm_support.kohya_merged_ldm(sd15["parts"], sd15["lora"])
    changed, _ = _compare(ours, ref, base)
    assert changed == len(ldm_support.SD15_UNET_TARGETS) + len(ldm_support.TE_TARGETS)


def test_sd15_equals_pipeline_merge(sd15: dict, merged_sd15: Path, tmp_path: Path) -> None:
    merge(sd15["pipeline"], [sd15["lora_path"]], tmp_path / "pipe")
    ours, base = load_file(str(merged_sd15)), load_file(str(sd15["ldm"]))
    changed, equal = _compare(ours, ldm_support.pipeline_ldm(tmp_path / "pipe"), base)
    assert changed == equal == len(ldm_support.SD15_UNET_TARGETS) + len(ldm_support.TE_TARGETS)


def test_sdxl_equals_kohya_and_pipeline_merge(sdxl: dict, tmp_path: Path) -> None:
    """SGM UNet names, both encoders, q/k/v into OpenCLIP's fused in_proj, a 1×1-conv LoRA on a linear proj_in."""
    out = tmp_path / "merged.safetensors"
    summary = merge(sdxl["ldm"], [sdxl["lora_path"]], out, verify=True)
    assert summary.verify is not None and summary.verify.verified
    ours, base = load_file(str(out)), load_file(str(sdxl["ldm"]))
    te2 = ldm_support.TE2_TARGETS
    qkv = [t for t in te2 if t.endswith(("q_proj", "k_proj", "v_proj"))]
    n_te2_tensors = len(te2) - len(qkv) + len({t.split(".self_attn")[0] for t in qkv})  # q, k, v share in_proj
    expected = len(ldm_support.SDXL_UNET_TARGETS) + len(ldm_support.TE_TARGETS) + n_te2_tensors
    changed, _ = _compare(ours, ldm_support.kohya_merged_ldm(sdxl["parts"], sdxl["lora"]), base)
    assert changed == expected
    merge(sdxl["pipeline"], [sdxl["lora_path"]], tmp_path / "pipe")
    changed, equal = _compare(ours, ldm_support.pipeline_ldm(tmp_path / "pipe"), base)
    assert changed == equal == expected


@pytest.mark.parametrize("case", ["sd15", "sdxl"])
def test_key_table_matches_diffusers_conversion(case: str, request: pytest.FixtureRequest) -> None:
    """Every alias points at the tensor diffusers' own LDM -> diffusers conversion puts at that diffusers name."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    c = request.getfixturevalue(case)
    ldm = load_file(str(c["ldm"]))
    layout = ldm_layout(ldm)
    assert layout is not None and layout.version == ("sdxl" if case == "sdxl" else "sd1")
    converted = {f"unet.{k}": v for k, v in convert_ldm_unet_checkpoint(ldm, dict(c["parts"]["unet"].config)).items()}
    if case == "sdxl":
        te2 = convert_open_clip_checkpoint(c["parts"]["text_encoder_2"], ldm, prefix="conditioner.embedders.1.model.")
        converted.update({f"text_encoder_2.{k}": v for k, v in te2.items()})
    checked = 0
    for alias, path in layout.aliases.items():
        if f"{alias}.weight" not in converted:
            assert not alias.startswith(("unet.", "text_encoder_2.")), alias
            continue
        fused = layout.fused.get(path)
        stored = ldm[fused.key].chunk(fused.parts)[fused.index] if fused else ldm[f"{path}.weight"]
        assert torch.equal(converted[f"{alias}.weight"], stored), alias
        checked += 1
    unet_modules = {k for k in converted if k.endswith(".weight")}
    assert checked >= len(unet_modules) - 2  # every UNet (and OpenCLIP) weight has its alias


def test_cli_merge_single_file(sd15: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from loratools.cli.main import cli

    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(cli, ["merge", str(sd15["ldm"]), str(sd15["lora_path"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert set(load_file(str(out))) == set(load_file(str(sd15["ldm"])))
