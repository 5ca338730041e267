"""A diffusers pipeline base: only the touched component is rewritten, the rest copied byte for byte."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from merge_support import TOL

from loratools import merge, verify

diffusers = pytest.importorskip("diffusers")


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def test_pipeline_only_touched_component_rewritten(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    unet = _unet()
    pipe = tmp_path / "pipe"
    unet.save_pretrained(str(pipe / "unet"))
    vae_like = _unet()  # a second weight component the adapter does not touch
    vae_like.save_pretrained(str(pipe / "other"))
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    index["other"] = ["diffusers", "UNet2DConditionModel"]
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (pipe / "model_index.json").write_text(json.dumps(index))

    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "conv1", "proj_in"], init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(unet), cfg).eval()
    state = {
        "unet." + k.removeprefix("base_model.model.").replace(".default", ""): v.detach().contiguous()
        for k, v in peft.state_dict().items()
        if "lora_" in k
    }
    (tmp_path / "lora").mkdir()
    save_file(state, str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    out = tmp_path / "merged"
    merge(pipe, [tmp_path / "lora"], out)

    for rel in ("other/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "model_index.json"):
        assert (out / rel).read_bytes() == (pipe / rel).read_bytes()
    merged = diffusers.UNet2DConditionModel.from_pretrained(str(out / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 3, 16, generator=g)
    with torch.no_grad():
        ref, before, got = (m(x, t, encoder_hidden_states=ctx).sample for m in (peft, unet, merged))
    assert (ref - before).abs().max() >= 100 * TOL
    assert (got - ref).abs().max() <= TOL
    assert verify(out, pipe, [tmp_path / "lora"]).verified
