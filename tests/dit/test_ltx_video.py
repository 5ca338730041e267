"""LTX-Video LoRAs (ComfyUI/musubi names = Lightricks' own, diffusers' names): merged into a pipeline equal to
diffusers' own loader (LTXPipeline.lora_state_dict = _convert_non_diffusers_ltxv_lora_to_diffusers +
load_lora_into_transformer + fuse_lora), into an original single file (patchify_proj/adaln_single as
convert_ltx_transformer_checkpoint_to_diffusers renames them), converted losslessly (issue 21)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import load_adapter, merge, save_adapter

#: diffusers' single-file renames (single_file_utils.convert_ltx_transformer_checkpoint_to_diffusers), inverted
RENAME = {"proj_in": "patchify_proj", "time_embed": "adaln_single", "norm_q": "q_norm", "norm_k": "k_norm"}


@pytest.fixture(scope="module")
def model():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    m = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   cross_attention_dim=16, num_layers=1, caption_channels=12).eval()  # fmt: skip
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


@pytest.fixture(scope="module")
def pipeline(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ltx") / "pipe"
    model.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LTXPipeline",
                                                         "transformer": ["diffusers", "LTXVideoTransformer3DModel"]}))
    return folder


def lora(model, prefix: str = "diffusion_model.", top: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for i, (name, lin) in enumerate((n, x) for n, x in model.named_modules() if isinstance(x, torch.nn.Linear)):
        if not top and not name.startswith("transformer_blocks"):
            continue
        if top:
            for new, old in RENAME.items():
                name = name.replace(new, old)
        r = 2 + i % 2
        out[f"{prefix}{name}.lora_A.weight"] = torch.randn(r, lin.in_features, generator=g) * 0.3
        out[f"{prefix}{name}.lora_B.weight"] = torch.randn(lin.out_features, r, generator=g) * 0.3
    return out


def _original(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for new, old in RENAME.items():
            k = k.replace(new, old)
        out[f"model.diffusion_model.{k}"] = v
    return out


def _weights(folder):
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_merge_into_pipeline_equals_diffusers(model, pipeline, tmp_path):
    from diffusers import LTXPipeline

    path = tmp_path / "ltx.safetensors"
    save_file(lora(model), str(path))
    assert load_adapter(path).meta["dit"] == {"family": "ltx_video", "layout": "comfyui"}
    merge(pipeline, [path], tmp_path / "out")
    theirs = copy.deepcopy(model)
    LTXPipeline.load_lora_into_transformer(LTXPipeline.lora_state_dict(str(path)), transformer=theirs, adapter_name="x")
    theirs.fuse_lora()
    want = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    ours = _weights(tmp_path / "out")
    assert set(ours) == set(want)
    assert max(float((ours[k] - want[k]).abs().max()) for k in ours) <= 1e-5
    assert max(float((ours[k] - model.state_dict()[k]).abs().max()) for k in ours) > 1e-2  # parity: it moved


def test_merge_into_original_single_file_with_top_level_names(model, pipeline, tmp_path):
    """patchify_proj / adaln_single LoRAs (ComfyUI names) merge into the single file and, renamed, the pipeline."""
    path = tmp_path / "ltx.safetensors"
    save_file(lora(model, top=True), str(path))
    base = tmp_path / "ltx-video-tiny.safetensors"
    save_file(_original(model.state_dict()), str(base))
    merge(base, [path], tmp_path / "merged.safetensors")
    merge(pipeline, [path], tmp_path / "out")
    merged, want = load_file(str(tmp_path / "merged.safetensors")), _original(_weights(tmp_path / "out"))
    assert set(merged) == set(want)
    assert max(float((merged[k] - want[k]).abs().max()) for k in merged) <= 1e-6
    assert not torch.equal(merged["model.diffusion_model.patchify_proj.weight"],
                           _original(model.state_dict())["model.diffusion_model.patchify_proj.weight"])


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_convert_is_lossless(model, tmp_path, fmt):
    path = tmp_path / "ltx.safetensors"
    save_file(lora(model, top=True), str(path))
    first = load_adapter(path)
    out = save_adapter(first, tmp_path / ("o" if fmt == "diffusers" else "o.safetensors"), format=fmt)
    back = load_adapter(out)
    assert back.meta["dit"]["family"] == "ltx_video" and set(back.modules) == set(first.modules)
    assert all(torch.equal(back.modules[k].delta(), m.delta()) for k, m in first.modules.items())


def test_attn1_only_file_is_told_by_the_ltx_base(model, pipeline, tmp_path):
    """attn1-only names are CogVideoX's too (formats/dit/cogvideox.py): alone refused saying to pass the base; with
    the LTX-Video pipeline (its transformer class) read as LTX-Video and merged as diffusers' loader does."""
    from diffusers import LTXPipeline

    from loratools.errors import UnsupportedError

    path = tmp_path / "attn1.safetensors"
    save_file({k: v for k, v in lora(model).items() if ".attn1." in k}, str(path))
    with pytest.raises(UnsupportedError, match="LTX-Video and CogVideoX share"):
        load_adapter(path)
    assert load_adapter(path, base=pipeline).meta["dit"]["family"] == "ltx_video"
    merge(pipeline, [path], tmp_path / "out")
    theirs = copy.deepcopy(model)
    LTXPipeline.load_lora_into_transformer(LTXPipeline.lora_state_dict(str(path)), transformer=theirs, adapter_name="x")
    theirs.fuse_lora()
    want = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    ours = _weights(tmp_path / "out")
    assert max(float((ours[k] - want[k]).abs().max()) for k in ours) <= 1e-5
    assert float((ours["transformer_blocks.0.attn1.to_q.weight"] - model.state_dict()[
        "transformer_blocks.0.attn1.to_q.weight"]).abs().max()) > 1e-2  # fmt: skip
