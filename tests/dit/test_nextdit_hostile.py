"""Broken Z-Image, Lumina2, Chroma and HiDream LoRAs: each refused by info, convert and merge with exit 2 and one
``Error:`` line naming the file and the tensor, nothing written — fused qkv factors that fit no split, missing
factors, NaN, unknown modules, LyCORIS/DoRA tensors; LoRAs given a base of another family: refused by merge,
naming both (issue 21 item 4). Variants are generated at test time from one valid kohya file of each tiny model
(nextdit_support), the way test_dit_hostile.py breaks a kohya Flux file."""

from __future__ import annotations

from collections.abc import Callable

import nextdit_support as S
import pytest
import torch
from safetensors.torch import save_file
from test_dit_hostile import _refused
from test_sd3_hunyuan_hostile import _add, _drop, _nan, _rows, _set

Tensors = dict[str, torch.Tensor]
ZQ = "lora_unet_layers_0_attention_to_q"
LQKV = "lora_unet_layers_0_attention_qkv"
CQKV = "lora_unet_double_blocks_0_img_attn_qkv"
HQ = "lora_unet_double_stream_blocks_0_block_attn1_to_q_t"


def _z_fused(sd: Tensors) -> Tensors:
    """The Z-Image file with a ComfyUI-named fused qkv of 47 rows (no thirds)."""
    return {**sd, "lora_unet_layers_1_attention_qkv.lora_down.weight": torch.ones(2, 32),
            "lora_unet_layers_1_attention_qkv.lora_up.weight": torch.ones(47, 2)}  # fmt: skip


BROKEN: list[tuple[str, str, Callable[[Tensors], Tensors], tuple[str, ...]]] = [
    ("qkv-thirds", "z_image", _z_fused, ("layers.1.attention.qkv", "47 rows")),
    ("no-up", "z_image", _drop(f"{ZQ}.lora_up.weight"), ("layers.0.attention.to_q", "lora_up")),
    ("nan-factor", "z_image", _set(f"{ZQ}.lora_down.weight", _nan), (ZQ, "NaN")),
    ("unknown-module", "z_image", _add("lora_unet_layers_0_attention_to_x.lora_down.weight", torch.ones(2, 32)),
     ("attention_to_x", "names no Z-Image module")),
    ("qkv-gqa-odd", "lumina2", _set(f"{LQKV}.lora_up.weight", _rows(63)), ("layers.0.attention.qkv", "63 rows")),
    ("qkv-no-kv", "lumina2", _set(f"{LQKV}.lora_up.weight", _rows(32)), ("layers.0.attention.qkv", "32 rows")),
    ("rank-mismatch", "lumina2", _set(f"{LQKV}.lora_up.weight", lambda t: t[:, :-1].contiguous()), ("rank",)),
    ("alpha-vector", "lumina2", _set(f"{LQKV}.alpha", lambda t: torch.ones(3)), ("qkv.alpha", "scalar")),
    ("qkv-rows", "chroma", _set(f"{CQKV}.lora_up.weight", _rows(47)), ("img_attn.qkv", "multiple of 3")),
    ("lokr", "chroma", _add(f"{CQKV}.lokr_w1", torch.ones(4, 4)), ("lokr_w1", "LyCORIS")),
    ("guidance-unknown", "chroma", _add("lora_unet_distilled_guidance_layer_layers_0_mid_layer.lora_down.weight",
                                        torch.ones(2, 16)), ("mid_layer", "names no Chroma module")),
    ("inf-factor", "hidream", _set(f"{HQ}.lora_up.weight", lambda t: t.clone().fill_(float("inf"))), (HQ, "NaN/Inf")),
    ("dora", "hidream", _add(f"{HQ}.dora_scale", torch.ones(16, 1)), ("dora_scale", "DoRA")),
    ("no-down", "hidream", _drop(f"{HQ}.lora_down.weight"), ("attn1.to_q_t", "lora_down")),
]  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return {n: F.model() for n, F in S.FAMILIES.items()}


@pytest.fixture(scope="module")
def valid(models) -> dict[str, Tensors]:
    return {n: S.FAMILIES[n].lora(models[n], "kohya", alphas="all") for n in S.FAMILIES}


@pytest.fixture(scope="module")
def pipelines(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-nextdit")
    return {n: S.FAMILIES[n].save_pipeline(models[n], root / n) for n in S.FAMILIES}


@pytest.mark.parametrize("command", ["info", "convert", "merge"])
@pytest.mark.parametrize(("name", "family", "damage", "expect"), BROKEN, ids=[f"{b[1]}-{b[0]}" for b in BROKEN])
def test_broken_file(valid, pipelines, tmp_path, name, family, damage, expect, command):
    path = tmp_path / f"{family}-{name}.safetensors"
    save_file(damage(dict(valid[family])), str(path))
    out = tmp_path / "out"
    args = {"info": ["info", path], "convert": ["convert", path, "--to", "diffusers", "-o", out],
            "merge": ["merge", pipelines[family], path, "-o", out]}[command]  # fmt: skip
    _refused(path, args, out, expect)


@pytest.mark.parametrize(("lora", "base", "words"), [
    ("z_image", "lumina2", ("a Z-Image LoRA", "Lumina2Transformer2DModel")),
    ("lumina2", "z_image", ("a Lumina2 LoRA", "ZImageTransformer2DModel")),
    ("hidream", "chroma", ("a HiDream LoRA", "ChromaTransformer2DModel")),
])  # fmt: skip
def test_a_lora_into_a_base_of_another_family_names_both(valid, pipelines, tmp_path, lora, base, words):
    path = tmp_path / f"{lora}.safetensors"
    save_file(valid[lora], str(path))
    out = tmp_path / "out"
    _refused(path, ["merge", pipelines[base], path, "-o", out], out, words)


def test_a_query_only_lumina2_lora_is_not_fused_without_the_widths(models, tmp_path):
    """Lumina2's key/value rows (grouped-query attention) are not the query's: a diffusers LoRA on to_q alone cannot
    be written as a fused qkv without knowing them, and says so (merging it is fine)."""
    from loratools import load_adapter, save_adapter
    from loratools.errors import UnsupportedError

    F, model = S.LUMINA2, models["lumina2"]
    path = tmp_path / "q.safetensors"
    save_file(F.lora(model, "diffusers", modules=["layers.0.attn.to_q"]), str(path))
    with pytest.raises(UnsupportedError, match="key/value width"):
        save_adapter(load_adapter(path), tmp_path / "k.safetensors", format="kohya")
