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
from loratools.checkpoint.ldm_keymap import ldm_layout


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


def test_sd2_equals_kohya_merge_lora(sd2: dict, tmp_path: Path) -> None:
    """SD2: sd-scripts' 1×1-conv proj_in/proj_out factors into the file's linear weights; OpenCLIP encoder."""
    out = tmp_path / "merged.safetensors"
    assert merge(sd2["ldm"], [sd2["lora_path"]], out, verify=True).verify.verified
    ours, base = load_file(str(out)), load_file(str(sd2["ldm"]))
    assert base["model.diffusion_model.input_blocks.2.1.proj_in.weight"].ndim == 2
    ref = ldm_support.kohya_merged_ldm(sd2["parts"], sd2["lora"])
    qkv = {t.split(".self_attn")[0] for t in ldm_support.TE_TARGETS if t.endswith(("q_proj", "k_proj", "v_proj"))}
    te = len([t for t in ldm_support.TE_TARGETS if not t.endswith(("q_proj", "k_proj", "v_proj"))]) + len(qkv)
    changed, _ = _compare(ours, ref, base)
    assert changed == len(ldm_support.SD15_UNET_TARGETS) + te


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


@pytest.mark.parametrize("case", ["sd15", "sd2", "sdxl"])
def test_key_table_matches_diffusers_conversion(case: str, request: pytest.FixtureRequest) -> None:
    """Every alias points at the tensor diffusers' own LDM -> diffusers conversion puts at that diffusers name."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    c = request.getfixturevalue(case)
    ldm = load_file(str(c["ldm"]))
    layout = ldm_layout(ldm)
    assert layout is not None and layout.version == {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl"}[case]
    converted = {f"unet.{k}": v for k, v in convert_ldm_unet_checkpoint(ldm, dict(c["parts"]["unet"].config)).items()}
    component = "unet"
    if case != "sd15":  # the OpenCLIP encoder, with q/k/v fused
        component, prefix = {"sd2": ("text_encoder", "cond_stage_model.model."),
                             "sdxl": ("text_encoder_2", "conditioner.embedders.1.model.")}[case]  # fmt: skip
        te = convert_open_clip_checkpoint(c["parts"][component], ldm, prefix=prefix)
        converted.update({f"{component}.{k}": v for k, v in te.items()})
    checked = 0
    for alias, path in layout.aliases.items():
        if alias in layout.short_aliases:  # the same modules without CLIP's text_model. level
            continue
        if f"{alias}.weight" not in converted:
            assert not alias.startswith(("unet.", f"{component}.")), alias
            continue
        fused = layout.fused.get(path)
        stored = ldm[fused.key].chunk(fused.parts)[fused.index] if fused else ldm[f"{path}.weight"]
        assert torch.equal(converted[f"{alias}.weight"], stored), alias
        checked += 1
    # every converted weight has its alias, but the two OpenCLIP parameters stored without ``.weight``
    missing = {k for k in converted if k.endswith(".weight") and k[: -len(".weight")] not in layout.aliases}
    assert {m.split(".", 1)[1] for m in missing} <= {
        "text_projection.weight",
        "text_model.embeddings.position_embedding.weight",
    }
    assert checked > 100


def test_cli_merge_single_file(sd15: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from loratools.cli.main import cli

    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(cli, ["merge", str(sd15["ldm"]), str(sd15["lora_path"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert set(load_file(str(out))) == set(load_file(str(sd15["ldm"])))
    args = ["verify", str(out), "--base", str(sd15["ldm"]), "--adapter", str(sd15["lora_path"])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "verified" in result.output, result.output


def test_validate_against_single_file(sdxl: dict) -> None:
    """validate --base sees fused parts and 1×1-conv factors on linear weights as the merge does."""
    from loratools.ops.validate import validate

    report = validate(sdxl["lora_path"], base=sdxl["ldm"])
    assert not [f for f in report.findings if f.severity == "error"], report.findings


def test_dora_into_fused_part_is_refused(sdxl: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from loratools.errors import UnsupportedError

    name = "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"
    lora = {k: v for k, v in sdxl["lora"].items() if k.startswith(name)}
    lora[f"{name}.dora_scale"] = torch.rand(lora[f"{name}.lora_up.weight"].shape[0], 1).half() + 0.5
    save_file(lora, str(tmp_path / "dora.safetensors"))
    fused = r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.0\.attn\.in_proj_weight"
    with pytest.raises(UnsupportedError, match=r"layers\.0\.self_attn\.k_proj is DoRA and only rows 32:64 of " + fused):
        merge(sdxl["ldm"], [tmp_path / "dora.safetensors"], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_diffusers_lora_into_single_file(sd15: dict, tmp_path: Path) -> None:
    """A diffusers-format LoRA (PEFT names ``unet.…``, ``text_encoder.…``, written by diffusers' own
    save_lora_weights) merges into the single file as into the pipeline folder."""
    import types

    import sd  # tests/formats/sd.py: diffusers' own writer

    pipe = types.SimpleNamespace(unet=sd15["parts"]["unet"], text_encoder=sd15["parts"]["text_encoder"])
    lora = sd.save_diffusers_lora(pipe, tmp_path / "diffusers-lora")
    merge(sd15["ldm"], [lora], tmp_path / "merged.safetensors")
    merge(sd15["pipeline"], [lora], tmp_path / "pipe")
    base = load_file(str(sd15["ldm"]))
    changed, equal = _compare(
        load_file(str(tmp_path / "merged.safetensors")), ldm_support.pipeline_ldm(tmp_path / "pipe"), base
    )
    assert changed == equal > 10


def test_fp32_single_file(sdxl: dict, tmp_path: Path) -> None:
    """An fp32 file takes the in-place fp32 path (fused rows included); --verify recomputes it another way."""
    from safetensors.torch import save_file

    base = tmp_path / "sdxl-fp32.safetensors"
    save_file({k: v.float() for k, v in load_file(str(sdxl["ldm"])).items()}, str(base))
    summary = merge(base, [sdxl["lora_path"]], tmp_path / "merged.safetensors", verify=True)
    assert summary.verify is not None and summary.verify.verified
    merged, before = load_file(str(tmp_path / "merged.safetensors")), load_file(str(base))
    key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    d = merged[key].shape[1]
    assert torch.equal(merged[key][d : 2 * d], before[key][d : 2 * d])  # k of layer 1 has no LoRA: its rows untouched
    assert float((merged[key][:d] - before[key][:d]).abs().max()) > 1e-2


@pytest.mark.parametrize("case", ["sd15", "sdxl"])
def test_names_are_the_pipelines(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Against the single file, kohya names resolve to the names the pipeline folder gives them, so
    convert --base FILE writes the same pipeline adapter as convert --base PIPELINE."""
    from loratools import load_adapter
    from loratools.ops.convert import convert

    c = request.getfixturevalue(case)
    by_file = load_adapter(c["lora_path"], base=c["ldm"])
    by_pipeline = load_adapter(c["lora_path"], base=c["pipeline"])
    assert sorted(by_file.modules) == sorted(by_pipeline.modules)
    assert all(n.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for n in by_file.modules)
    convert(c["lora_path"], "diffusers", tmp_path / "a", base=c["ldm"])
    convert(c["lora_path"], "diffusers", tmp_path / "b", base=c["pipeline"])
    a, b = (load_file(str(p / "pytorch_lora_weights.safetensors")) for p in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
