"""Broken Wan and Qwen-Image LoRAs: each refused by info, convert and merge with exit 2 and one ``Error:`` line naming
the file and the tensor, nothing written; LoRAs given a base of another family or size: refused by merge, naming
both (issue 21 item 4).

The variants are generated at test time from one valid musubi-tuner Wan file and one ai-toolkit Qwen-Image file of
the tiny models (wan_qwen_support), the way test_dit_hostile.py breaks a kohya Flux file.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import wan_qwen_support as S
from safetensors.torch import save_file
from test_dit_hostile import _refused

Tensors = dict[str, torch.Tensor]
WQ = "lora_unet_blocks_0_self_attn_q"
WF = "lora_unet_blocks_1_ffn_0"
QF = "diffusion_model.transformer_blocks.0.img_mlp.net.0.proj"
QA = "diffusion_model.transformer_blocks.1.attn.add_k_proj"


def _drop(key: str) -> Callable[[Tensors], Tensors]:
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Tensors], Tensors]:
    return lambda sd: {**sd, key: value(sd[key])}


def _add(key: str, value: torch.Tensor) -> Callable[[Tensors], Tensors]:
    return lambda sd: {**sd, key: value}


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = float("nan")
    return t


#: (name, family, how its valid file is broken, what the one error line must say)
BROKEN: list[tuple[str, str, Callable[[Tensors], Tensors], tuple[str, ...]]] = [
    ("no-up", "wan", _drop(f"{WQ}.lora_up.weight"), ("blocks.0.self_attn.q", "lora_up")),
    ("no-down", "wan", _drop(f"{WF}.lora_down.weight"), ("blocks.1.ffn.0", "lora_down")),
    ("rank-mismatch", "wan", _set(f"{WQ}.lora_up.weight", lambda t: t[:, :-1].contiguous()), ("self_attn.q", "rank")),
    ("alpha-vector", "wan", _set(f"{WQ}.alpha", lambda t: torch.ones(3)), ("self_attn.q.alpha", "scalar")),
    ("alpha-nan", "wan", _set(f"{WQ}.alpha", lambda t: torch.tensor(float("nan"))), (f"{WQ}.alpha", "NaN")),
    ("alpha-inf", "wan", _add(f"{WF}.alpha", torch.tensor(float("inf"))), (f"{WF}.alpha", "Inf")),
    ("nan-factor", "wan", _set(f"{WF}.lora_up.weight", _nan), (WF, "NaN")),
    ("inf-factor", "wan", _set(f"{WQ}.lora_down.weight", lambda t: t.clone().fill_(float("-inf"))), (WQ, "NaN/Inf")),
    ("three-d", "wan", _set(f"{WQ}.lora_down.weight", lambda t: t.unsqueeze(-1).contiguous()), ("self_attn.q", "2-D")),
    ("int-factor", "wan", _set(f"{WQ}.lora_down.weight", lambda t: t.to(torch.int32)), (WQ, "float")),
    ("unknown-module", "wan", _add("lora_unet_blocks_0_self_attn_qx.lora_down.weight", torch.ones(2, 2)),
     ("self_attn_qx", "names no Wan module")),
    ("conv-patch", "wan", _add("lora_unet_patch_embedding.lora_down.weight", torch.ones(2, 4, 1, 2, 2)),
     ("patch_embedding", "names no Wan module")),
    ("unknown-part", "wan", _add(f"{WQ}.lora_mid.weight", torch.ones(2, 2)), ("lora_mid", "not a Wan LoRA tensor")),
    ("dora", "wan", _add(f"{WQ}.dora_scale", torch.ones(16, 1)), ("dora_scale", "DoRA")),
    ("lokr", "wan", _add(f"{WQ}.lokr_w1", torch.ones(4, 4)), ("lokr_w1", "LyCORIS")),
    ("diff-b", "wan", _add(f"{WQ}.diff_b", torch.ones(16)), ("diff_b", "full-weight difference")),
    ("two-downs", "wan", lambda sd: {**sd, f"{WQ}.lora_A.weight": sd[f"{WQ}.lora_down.weight"].clone()},
     (WQ, "two down")),
    ("no-B", "qwen_image", _drop(f"{QF}.lora_B.weight"), ("img_mlp.net.0.proj", "lora_up")),
    ("no-A", "qwen_image", _drop(f"{QA}.lora_A.weight"), ("attn.add_k_proj", "lora_down")),
    ("B-rank", "qwen_image", _set(f"{QF}.lora_B.weight", lambda t: torch.cat([t, t], 1)),
     ("img_mlp.net.0.proj", "rank")),
    ("nan", "qwen_image", _set(f"{QA}.lora_B.weight", _nan), (QA, "NaN")),
    ("alpha-nan", "qwen_image", _add(f"{QF}.alpha", torch.tensor(float("nan"))), (f"{QF}.alpha", "NaN")),
    ("bf16-inf", "qwen_image", _set(f"{QF}.lora_A.weight", lambda t: t.to(torch.bfloat16).fill_(float("inf"))),
     (QF, "NaN/Inf")),
    ("empty", "qwen_image", _set(f"{QA}.lora_A.weight", lambda t: t[:0].contiguous()), ("attn.add_k_proj",)),
    ("unknown-module", "qwen_image", _add("diffusion_model.transformer_blocks.0.img_mlp.net.9.lora_A.weight",
                                          torch.ones(2, 2)), ("img_mlp.net.9", "names no Qwen-Image module")),
    ("adapter-name", "qwen_image", lambda sd: {**sd, f"{QF}.lora_A.default.weight": sd[f"{QF}.lora_A.weight"].clone()},
     (QF, "two down")),
    ("diff", "qwen_image", _add(f"{QF}.diff", torch.ones(64, 16)), ("diff", "full-weight difference")),
]  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return {"wan": S.WAN.model(), "qwen_image": S.QWEN.model()}


@pytest.fixture(scope="module")
def valid(models) -> dict[str, Tensors]:
    return {"wan": S.WAN.lora(models["wan"], "kohya"),
            "qwen_image": S.QWEN.lora(models["qwen_image"], "aitoolkit", alphas="none")}  # fmt: skip


@pytest.fixture(scope="module")
def pipelines(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-wq")
    return {"wan": S.WAN.save_pipeline(models["wan"], root / "wan"),
            "qwen_image": S.QWEN.save_pipeline(models["qwen_image"], root / "qwen")}  # fmt: skip


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
    """Wan into a Qwen-Image pipeline (they share proj_out), Qwen-Image into a Wan-AI single file, Wan into a Flux
    pipeline: one line naming the LoRA's family and the base's."""
    import dit_support

    wan, qwen = tmp_path / "wan.safetensors", tmp_path / "qwen.safetensors"
    save_file(valid["wan"], str(wan))
    save_file(valid["qwen_image"], str(qwen))
    single = tmp_path / "wan2.1-tiny.safetensors"
    save_file(S.WAN.to_original(models["wan"].state_dict(), "model.diffusion_model."), str(single))
    flux = dit_support.save_pipeline(dit_support.transformer(), tmp_path / "flux")
    cases = [
        (wan, pipelines["qwen_image"], ("a Wan LoRA", "only 1 of", "QwenImageTransformer2DModel")),
        (qwen, single, ("a Qwen-Image LoRA", "none of its modules", "a Wan checkpoint")),
        (wan, flux, ("a Wan LoRA", "FluxTransformer2DModel")),
        (qwen, pipelines["wan"], ("a Qwen-Image LoRA", "WanTransformer3DModel")),
    ]
    for i, (lora, base, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        _refused(lora, ["merge", base, lora, "-o", out], out, words)


def test_a_lora_of_another_size_is_refused_naming_the_tensor(valid, tmp_path):
    """A Wan file of hidden width 16 into a Wan of width 24: the shapes, module and base tensor named."""
    from test_dit_hostile import invoke

    wide = S.Family("wan", "WanPipeline", "WanTransformer3DModel", {**S.WAN_CONFIG, "attention_head_dim": 12})
    pipe = wide.save_pipeline(wide.model(), tmp_path / "wide")
    lora = tmp_path / "wan.safetensors"
    save_file(valid["wan"], str(lora))
    code, _, stderr = invoke("merge", pipe, lora, "-o", tmp_path / "out")
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error: ")]
    assert code == 2 and len(errors) == 1, stderr
    assert "transformer.blocks.0" in errors[0] and "(24, 24)" in errors[0], errors[0]
    assert not (tmp_path / "out").exists()
