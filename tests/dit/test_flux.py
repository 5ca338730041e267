"""Flux LoRAs in every trainer layout: read, merged into a pipeline / transformer folder / original-layout single
file, converted between layouts — against diffusers' own loader (FluxPipeline.lora_state_dict +
load_lora_into_transformer + fuse_lora) where diffusers is right, and against sd-scripts' rule (W += alpha/rank ·
B·A on the original, fused weight) where it is not (issue 21)."""

from __future__ import annotations

import copy

import dit_support as S
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import load_adapter, merge, save_adapter

#: modules diffusers 0.42 applies from a kohya Flux file (its converter names the top-level ones without
#: ``transformer.``, so they are dropped; and its single-block split hard-codes 3072/12288)
DIFFUSERS_OK = tuple(m for m in S.BFL_MODULES if m.startswith("double_blocks") or m.startswith("single_blocks")
                     and not m.endswith("linear1"))  # fmt: skip
TOP = tuple(m for m in S.BFL_MODULES if not m.startswith(("double_blocks", "single_blocks")))


@pytest.fixture(scope="module", params=["", "model.diffusion_model."])
def bfl_file(model, tmp_path_factory, request):
    path = tmp_path_factory.mktemp("bfl") / "flux1-tiny.safetensors"
    save_file(S.to_bfl(model.state_dict(), request.param), str(path))
    return path, request.param


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def _fused(model) -> dict[str, torch.Tensor]:
    model.fuse_lora()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def _close(ours: dict, theirs: dict, atol: float = 1e-5) -> None:
    assert set(ours) == set(theirs)
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    assert worst <= atol, worst


def _sd_scripts(model, lora: dict) -> dict[str, torch.Tensor]:
    """sd-scripts' merge (networks/flux_merge_lora.py): W += alpha/rank · up @ down on the original layout's
    fused weights, then the result in diffusers' names (the test's own table, dit_support.from_bfl)."""
    bfl = S.to_bfl(model.state_dict())
    stems = {k.rsplit(".", 2)[0] for k in lora if k.endswith(("lora_down.weight", "lora_A.weight"))}
    for stem in stems:
        down = lora.get(f"{stem}.lora_down.weight", lora.get(f"{stem}.lora_A.weight"))
        up = lora.get(f"{stem}.lora_up.weight", lora.get(f"{stem}.lora_B.weight"))
        alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else down.shape[0]
        name = stem.removeprefix("diffusion_model.")
        if stem.startswith("lora_unet_"):
            name = next(m for m in S.BFL_MODULES if "lora_unet_" + m.replace(".", "_") == stem)
        bfl[f"{name}.weight"] = bfl[f"{name}.weight"] + alpha / down.shape[0] * up.float() @ down.float()
    return S.from_bfl(bfl)


def test_the_lora_moves_the_output_far_beyond_the_tolerance(model, tmp_path):
    path = tmp_path / "k.safetensors"
    save_file(S.kohya_flux(model, DIFFUSERS_OK), str(path))
    moved = S.forward(S.diffusers_fused(copy.deepcopy(model), path)) - S.forward(model)
    assert float(moved.abs().max()) > 100 * 1e-4


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_merge_into_pipeline_equals_diffusers(model, pipeline, tmp_path, layout):
    path = tmp_path / f"{layout}.safetensors"
    save_file(S.kohya_flux(model, DIFFUSERS_OK, layout=layout), str(path))
    assert load_adapter(path).meta["dit"] == {"family": "flux", "layout": layout}
    merge(pipeline, [path], tmp_path / "out")
    theirs = S.diffusers_fused(copy.deepcopy(model), path)
    out_theirs = S.forward(theirs)
    _close(_weights(tmp_path / "out"), _fused(theirs))
    from diffusers import FluxTransformer2DModel

    ours = FluxTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()
    assert float((S.forward(ours) - out_theirs).abs().max()) <= 1e-4


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "bfl"])
def test_every_module_follows_sd_scripts(model, pipeline, tmp_path, layout):
    """linear1 (split by the input width, not diffusers' 3072) and the top-level modules diffusers drops."""
    lora = S.kohya_flux(model, layout=layout)
    path = tmp_path / "all.safetensors"
    save_file(lora, str(path))
    merge(pipeline, [path], tmp_path / "out")
    _close(_weights(tmp_path / "out"), _sd_scripts(model, lora))
    # what diffusers does with the same file: the top-level modules change nothing (documented in formats.md)
    if layout != "bfl":
        stems = {f"lora_unet_{m.replace('.', '_')}." if layout == "kohya" else f"diffusion_model.{m}." for m in TOP}
        top = {k: v for k, v in lora.items() if k.startswith(tuple(stems))}
        save_file(top, str(tmp_path / "top.safetensors"))
        before = model.state_dict()
        after = _fused(S.diffusers_fused(copy.deepcopy(model), tmp_path / "top.safetensors"))
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_merge_into_transformer_folder(model, pipeline, tmp_path):
    lora = S.kohya_flux(model)
    path = tmp_path / "k.safetensors"
    save_file(lora, str(path))
    merge(pipeline / "transformer", [path], tmp_path / "out")
    _close(load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors")), _sd_scripts(model, lora))


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "bfl", "diffusers"])
def test_merge_into_original_layout_file(model, bfl_file, tmp_path, layout):
    base, prefix = bfl_file
    path = tmp_path / "lora.safetensors"
    if layout == "diffusers":  # its own A per q/k/v: fused into qkv/linear1 with a block-diagonal B
        tensors, config = S.diffusers_flux(model)
        save_file(tensors, str(path))
        pipe = S.save_pipeline(model, tmp_path / "pipe")
        merge(pipe, [path], tmp_path / "want")
        want = _weights(tmp_path / "want")
    else:
        lora = S.kohya_flux(model, layout=layout)
        save_file(lora, str(path))
        want = _sd_scripts(model, lora)
    out = tmp_path / "merged.safetensors"
    merge(base, [path], out)
    merged = load_file(str(out))
    assert set(merged) == set(load_file(str(base)))
    _close(S.from_bfl(merged, prefix), want)


def test_diffusers_layout_with_and_without_metadata(model, pipeline, tmp_path):
    import json

    tensors, config = S.diffusers_flux(model)
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    for name, metadata in (("with", meta), ("without", None)):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        merge(pipeline, [path], tmp_path / name)
        _close(_weights(tmp_path / name), _fused(S.diffusers_fused(copy.deepcopy(model), path)))


def _adapter_equal(a, b) -> None:
    assert set(a.modules) == set(b.modules)
    for k, m in a.modules.items():
        assert torch.allclose(m.delta(), b.modules[k].delta(), atol=1e-6, rtol=0), k


@pytest.mark.parametrize("start", ["kohya", "comfyui", "bfl", "diffusers"])
def test_convert_between_layouts_is_lossless(model, tmp_path, start):
    path = tmp_path / "start.safetensors"
    save_file(S.diffusers_flux(model)[0] if start == "diffusers" else S.kohya_flux(model, layout=start), str(path))
    first = load_adapter(path)
    kohya = save_adapter(first, tmp_path / "k.safetensors", format="kohya")
    comfy = save_adapter(load_adapter(kohya), tmp_path / "c.safetensors", format="comfyui")
    diff = save_adapter(load_adapter(comfy), tmp_path / "d", format="diffusers")
    back = save_adapter(load_adapter(diff), tmp_path / "k2.safetensors", format="kohya")
    for p in (kohya, comfy, diff, back):
        _adapter_equal(load_adapter(p), first)
    if start == "kohya":  # split then fused again: the very tensors (shared A found, B rows stacked back)
        a, b = load_file(str(path)), load_file(str(back))
        assert set(a) <= set(b) and all(torch.equal(a[k], b[k]) for k in a)
    if start == "diffusers":  # fused block-diagonally then split: each part's own rank and tensors come back
        a = load_file(str(path))
        b = load_file(str(diff / "pytorch_lora_weights.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_converted_files_load_back_in_diffusers_with_nothing_left_over(model, tmp_path, fmt):
    src = tmp_path / "src.safetensors"
    save_file(S.kohya_flux(model, DIFFUSERS_OK), str(src))
    out = save_adapter(load_adapter(src), tmp_path / ("out" if fmt == "diffusers" else "out.safetensors"), format=fmt)
    file = out / "pytorch_lora_weights.safetensors" if fmt == "diffusers" else out
    theirs = S.diffusers_fused(copy.deepcopy(model), file)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in theirs.named_parameters() if ".lora_A." in n}
    assert lora_layers == {k.removeprefix("transformer.") for k in load_adapter(src).modules}
    merge(S.save_pipeline(model, tmp_path / "p"), [src], tmp_path / "m")
    _close(_weights(tmp_path / "m"), _fused(theirs))


def test_info_names_family_and_layout(model, tmp_path):
    from loratools.ops.info import summarize

    path = tmp_path / "k.safetensors"
    save_file(S.kohya_flux(model), str(path))
    assert summarize(load_adapter(path))["dit"] == {"family": "flux", "layout": "kohya", "label": "Flux"}
