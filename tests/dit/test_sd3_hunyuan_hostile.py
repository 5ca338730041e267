"""Broken SD3 and HunyuanVideo LoRAs: each refused by info, convert and merge with exit 2 and one ``Error:`` line
naming the file and the tensor, nothing written — fused qkv / linear1 factors that fit no split, swapped halves of
an odd row count, a conv LoRA half 2-D, HunyuanVideo's Conv3d embedder; LoRAs given a base of another family: refused by
merge, naming both (issue 21 item 4).

The variants are generated at test time from one valid sd-scripts SD3.5 file and one musubi-tuner HunyuanVideo
file of the tiny models (sd3_hunyuan_support), the way test_dit_hostile.py breaks a kohya Flux file.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sd3_hunyuan_support as S
import torch
from safetensors.torch import save_file
from test_dit_hostile import _refused
from test_wan_qwen_hostile import Tensors, _add, _drop, _nan, _set

QKV = "lora_unet_joint_blocks_0_x_block_attn_qkv"
CTX = "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"
FIN = "lora_unet_final_layer_adaLN_modulation_1"
HQKV = "lora_unet_double_blocks_0_img_attn_qkv"
L1 = "lora_unet_single_blocks_0_linear1"
REF = "lora_unet_txt_in_individual_token_refiner_blocks_0_self_attn_qkv"




def _rows(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[:n].contiguous()


#: (name, family, how its valid file is broken, what the one error line must say)
BROKEN: list[tuple[str, str, Callable[[Tensors], Tensors], tuple[str, ...]]] = [
    ("qkv-rows", "sd3", _set(f"{QKV}.lora_up.weight", _rows(47)), ("x_block.attn.qkv", "multiple of 3 rows")),
    ("final-odd", "sd3", _set(f"{FIN}.lora_up.weight", _rows(31)), ("final_layer.adaLN_modulation.1", "even row")),
    ("no-up", "sd3", _drop(f"{QKV}.lora_up.weight"), ("joint_blocks.0.x_block.attn.qkv", "lora_up")),
    ("rank-mismatch", "sd3", _set(f"{QKV}.lora_up.weight", lambda t: t[:, :-1].contiguous()), ("attn.qkv", "rank")),
    ("alpha-nan", "sd3", _set(f"{QKV}.alpha", lambda t: torch.tensor(float("nan"))), (f"{QKV}.alpha", "NaN")),
    ("nan-factor", "sd3", _set(f"{QKV}.lora_down.weight", _nan), (QKV, "NaN")),
    ("conv-half", "sd3", lambda sd: {**sd, "lora_unet_x_embedder_proj.lora_down.weight": torch.ones(2, 4, 1, 1),
                                     "lora_unet_x_embedder_proj.lora_up.weight": torch.ones(16, 2)},
     ("x_embedder.proj", "2-D")),
    ("unknown-module", "sd3", _add("lora_unet_joint_blocks_0_x_block_attn3_qkv.lora_down.weight", torch.ones(2, 16)),
     ("attn3_qkv", "names no SD3 module")),
    ("lokr", "sd3", _add(f"{QKV}.lokr_w1", torch.ones(4, 4)), ("lokr_w1", "LyCORIS")),
    ("qkv-rows", "hunyuan_video", _set(f"{HQKV}.lora_up.weight", _rows(47)), ("img_attn_qkv", "multiple of 3")),
    ("linear1-short", "hunyuan_video", _set(f"{L1}.lora_up.weight", _rows(48)),
     ("single_blocks.0.linear1", "3·D+MLP")),
    ("refiner-rows", "hunyuan_video", _set(f"{REF}.lora_up.weight", _rows(46)), ("self_attn_qkv", "multiple of 3")),
    ("no-down", "hunyuan_video", _drop(f"{L1}.lora_down.weight"), ("single_blocks.0.linear1", "lora_down")),
    ("alpha-vector", "hunyuan_video", _set(f"{HQKV}.alpha", lambda t: torch.ones(3)), ("img_attn_qkv.alpha", "scalar")),
    ("inf-factor", "hunyuan_video", _set(f"{L1}.lora_up.weight", lambda t: t.clone().fill_(float("inf"))),
     (L1, "NaN/Inf")),
    ("conv3d-embedder", "hunyuan_video", _add("lora_unet_img_in_proj.lora_down.weight", torch.ones(2, 4, 1, 1, 1)),
     ("img_in_proj", "names no HunyuanVideo module")),
    ("dora", "hunyuan_video", _add(f"{HQKV}.dora_scale", torch.ones(48, 1)), ("dora_scale", "DoRA")),
]  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return {"sd3": S.SD3.model(), "hunyuan_video": S.HV.model()}


@pytest.fixture(scope="module")
def valid(models) -> dict[str, Tensors]:
    return {"sd3": S.SD3.lora(models["sd3"], "kohya", alphas="all"),
            "hunyuan_video": S.HV.lora(models["hunyuan_video"], "kohya", alphas="all")}  # fmt: skip


@pytest.fixture(scope="module")
def pipelines(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-sd3-hv")
    return {"sd3": S.SD3.save_pipeline(models["sd3"], root / "sd3"),
            "hunyuan_video": S.HV.save_pipeline(models["hunyuan_video"], root / "hv")}  # fmt: skip


def test_the_valid_files_are_read(valid, tmp_path):
    from loratools import load_adapter

    for family, tensors in valid.items():
        path = tmp_path / f"{family}.safetensors"
        save_file(tensors, str(path))
        assert load_adapter(path).meta["dit"] == {"family": family, "layout": "kohya"}


@pytest.mark.parametrize("command", ["info", "convert", "merge"])
@pytest.mark.parametrize(("name", "family", "damage", "expect"), BROKEN, ids=[f"{b[1]}-{b[0]}" for b in BROKEN])
def test_broken_file(valid, pipelines, tmp_path, name, family, damage, expect, command):
    path = tmp_path / f"{family}-{name}.safetensors"
    save_file(damage(dict(valid[family])), str(path))
    out = tmp_path / "out"
    args = {"info": ["info", path], "convert": ["convert", path, "--to", "diffusers", "-o", out],
            "merge": ["merge", pipelines[family], path, "-o", out]}[command]  # fmt: skip
    _refused(path, args, out, expect)


def test_a_lora_into_a_base_of_another_family_names_both(models, valid, pipelines, tmp_path):
    """HunyuanVideo into an SD3.5 single file: one line naming the LoRA's family and the base's. SD3 into a
    HunyuanVideo or Flux pipeline, HunyuanVideo into an SD3 pipeline: most diffusers double-block names bind, so the
    first module that does not is named."""
    import dit_support

    sd3, hv = tmp_path / "sd3.safetensors", tmp_path / "hv.safetensors"
    save_file(valid["sd3"], str(sd3))
    save_file(valid["hunyuan_video"], str(hv))
    single = tmp_path / "sd3.5-tiny.safetensors"
    save_file(S.SD3.to_original(models["sd3"].state_dict(), "model.diffusion_model."), str(single))
    flux = dit_support.save_pipeline(dit_support.transformer(), tmp_path / "flux")
    cases = [
        (sd3, pipelines["hunyuan_video"], ("transformer.context_embedder", "not in the base")),  # most names bind
        (sd3, flux, ("transformer_blocks.0.attn2", "not in the base")),
        (hv, single, ("a HunyuanVideo LoRA", "none of its modules", "an SD3 checkpoint")),
        (hv, pipelines["sd3"], ("transformer.time_text_embed.guidance_embedder", "not in the base")),
    ]
    for i, (lora, base, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        _refused(lora, ["merge", base, lora, "-o", out], out, words)


def test_a_misshapen_modulation_is_refused_by_merge_naming_the_shapes(valid, pipelines, tmp_path):
    """An SD3 context_block modulation of 31 rows (neither 6·D nor the pre_only 2·D): read as it is (no split to
    check), refused by merge naming the module and both shapes."""
    path = tmp_path / "odd.safetensors"
    save_file(_set(f"{CTX}.lora_up.weight", _rows(31))(dict(valid["sd3"])), str(path))
    out = tmp_path / "out"
    _refused(path, ["merge", pipelines["sd3"], path, "-o", out], out, ("norm1_context.linear", "(32, 16)"))
