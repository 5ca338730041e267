"""SD3/SD3.5 and HunyuanVideo LoRAs in every layout their trainers write: read, merged into a pipeline / transformer
folder / original-layout single file, converted between layouts (fused qkv and HunyuanVideo's linear1 split and
fused exactly) — against diffusers' own loaders (StableDiffusion3Pipeline / HunyuanVideoPipeline.lora_state_dict +
load_lora_adapter + fuse_lora) where diffusers reads the file right, and against the trainers' rule (W += alpha/rank
· B·A on the fused original weight; sd-scripts, musubi-tuner, ComfyUI) where it does not (issue 21)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import sd3_hunyuan_support as S
import torch
from safetensors.torch import load_file, save_file
from wan_qwen_support import close, fused

from loratools import load_adapter, merge, save_adapter
from loratools.formats.dit.layouts import LABELS

FAMILIES = {"sd3": S.SD3, "hunyuan_video": S.HV}


@pytest.fixture(scope="module")
def models():
    return {name: F.model() for name, F in FAMILIES.items()}


@pytest.fixture(scope="module")
def pipelines(models, tmp_path_factory):
    return {n: FAMILIES[n].save_pipeline(m, tmp_path_factory.mktemp(n) / "pipe") for n, m in models.items()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, models, pipelines):
    return FAMILIES[request.param], models[request.param], pipelines[request.param]


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def _diffusers_file(model, path, metadata: bool = True) -> None:
    """A diffusers-layout LoRA on every Linear (the Flux tests' generator is generic), alphas per module."""
    import dit_support

    tensors, config = dit_support.diffusers_flux(model)
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(tensors, str(path), metadata=meta if metadata else None)


#: HunyuanVideo modules diffusers 0.42 converts right at a tiny width: not linear1 (split at 3072 whatever the
#: width), not the token refiner's self_attn_qkv (its lora_A is chunked into thirds of the rank) and not
#: final_layer.adaLN_modulation.1 (it swaps the halves of lora_A's rank rows with B's: another update)
def _hv_diffusers_ok(name: str) -> bool:
    return not name.endswith(("linear1", "self_attn_qkv", "final_layer.adaLN_modulation.1"))


def test_the_names_are_diffusers_own(models):
    """The tests' original names are what diffusers' single-file converters take back exactly (HunyuanVideo's
    without single blocks: its converter splits linear1 at 3072), and the tables map every Linear the same way."""
    from diffusers.loaders.single_file_utils import (
        convert_hunyuan_video_transformer_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    from loratools.formats.dit import hunyuan_video, sd3

    for F, convert, table in ((S.SD3, convert_sd3_transformer_checkpoint_to_diffusers, sd3.TABLE),
                              (S.HV, convert_hunyuan_video_transformer_to_diffusers, hunyuan_video.TABLE)):  # fmt: skip
        state = models[F.name].state_dict()
        original = F.to_original(state, "model.diffusion_model." if F.name == "sd3" else "")
        if F.name == "hunyuan_video":  # (its converter strips no prefix)
            original = {k: v for k, v in original.items() if not k.startswith("single_blocks.")}
            state = {k: v for k, v in state.items() if not k.startswith("single_transformer_blocks.")}
        back = convert(dict(original))
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
        for orig, diffs, _ in F.groups():
            if orig + ".weight" in F.to_original(models[F.name].state_dict()) and orig in F.linears(models[F.name]):
                assert table.to_diffusers(orig) == tuple(diffs), orig
                for i, d in enumerate(diffs):
                    assert table.to_original(d) == (orig, i, len(diffs)), d
                assert table.from_kohya(orig.replace(".", "_")) == orig


def test_hunyuan_linear1_split_equals_diffusers_at_full_width(tmp_path):
    """diffusers hard-codes HunyuanVideo's width (3072) in its LoRA converter: at that width its split of a
    musubi ``diffusion_model.`` file (linear1 into q, k, v, proj_mlp; the qkv thirds) is loratools' split."""
    import diffusers

    g = torch.Generator().manual_seed(0)
    d, r = 3072, 4
    lora = {
        "diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.randn(r, d, generator=g),
        "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.randn(7 * d, r, generator=g),
        "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight": torch.randn(r, d, generator=g),
        "diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight": torch.randn(3 * d, r, generator=g),
        "diffusion_model.single_blocks.0.linear2.lora_A.weight": torch.randn(r, 5 * d, generator=g),
        "diffusion_model.single_blocks.0.linear2.lora_B.weight": torch.randn(d, r, generator=g),
    }
    path = tmp_path / "full.safetensors"
    save_file(lora, str(path))
    theirs = diffusers.HunyuanVideoPipeline.lora_state_dict(str(path))
    ours = load_adapter(path)
    assert ours.meta["dit"] == {"family": "hunyuan_video", "layout": "comfyui"}
    assert {k.rsplit(".lora_", 1)[0] for k in theirs} == set(ours.modules)
    for name, m in ours.modules.items():
        assert torch.equal(m.down, theirs[f"{name}.lora_A.weight"]), name
        assert torch.equal(m.up, theirs[f"{name}.lora_B.weight"]), name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_lora_moves_the_output_far_beyond_the_tolerance(models, tmp_path, name):
    F, model = FAMILIES[name], models[name]
    path = tmp_path / "d.safetensors"
    _diffusers_file(model, path)
    moved = F.forward(F.diffusers_fused(copy.deepcopy(model), path)) - F.forward(model)
    assert float(moved.abs().max()) > 100 * 1e-4


@pytest.mark.parametrize("metadata", [True, False])
def test_diffusers_layout_merges_as_diffusers(family, tmp_path, metadata):
    F, model, pipe = family
    path = tmp_path / "d.safetensors"
    _diffusers_file(model, path, metadata)
    assert load_adapter(path).meta["dit"]["layout"] == "diffusers"
    merge(pipe, [path], tmp_path / "out")
    theirs = F.diffusers_fused(copy.deepcopy(model), path)
    close(_weights(tmp_path / "out"), fused(theirs))
    import diffusers

    ours = getattr(diffusers, F.transformer).from_pretrained(tmp_path / "out" / "transformer").eval()
    assert float((F.forward(ours) - F.forward(theirs)).abs().max()) <= 1e-4


@pytest.mark.parametrize("layout", ["musubi-other", "original"])
def test_hunyuan_original_names_merge_as_diffusers(models, pipelines, tmp_path, layout):
    """musubi's ``convert_lora.py --target other`` (diffusion_model. + lora_A/B, alpha folded) and the bare original
    names: what diffusers' HunyuanVideo converter reads (modules it converts right at this width, no alphas)."""
    F, model = S.HV, models["hunyuan_video"]
    lora = F.lora(model, layout, [n for n in F.linears(model) if _hv_diffusers_ok(n)], alphas="none")
    path = tmp_path / "o.safetensors"
    save_file(lora, str(path))
    merge(pipelines["hunyuan_video"], [path], tmp_path / "out")
    theirs = fused(F.diffusers_fused(copy.deepcopy(model), path))
    close(_weights(tmp_path / "out"), theirs)
    close(_weights(tmp_path / "out"), F.trainer_merge(model, lora))


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "original", "musubi-other"])
def test_every_module_follows_the_trainers_rule(family, tmp_path, layout):
    """Every Linear, fused ones included, alphas per module (every third none): sd-scripts / musubi's merge rule."""
    F, model, pipe = family
    lora = F.lora(model, layout)
    path = tmp_path / "all.safetensors"
    save_file(lora, str(path))
    assert load_adapter(path).meta["dit"]["family"] == F.name
    merge(pipe, [path], tmp_path / "out")
    close(_weights(tmp_path / "out"), F.trainer_merge(model, lora))


def test_diffusers_misreads_hunyuan_final_layer(models, tmp_path):
    """What docs/formats.md says: diffusers' HunyuanVideo converter swaps final_layer.adaLN_modulation.1's lora_A
    rows with lora_B's (shift/scale halves), so its update is not the file's; loratools follows musubi's rule."""
    F, model = S.HV, models["hunyuan_video"]
    lora = F.lora(model, "musubi-other", ["final_layer.adaLN_modulation.1"], alphas="none")
    path = tmp_path / "f.safetensors"
    save_file(lora, str(path))
    theirs = fused(F.diffusers_fused(copy.deepcopy(model), path))
    want = F.trainer_merge(model, lora)
    assert float((theirs["norm_out.linear.weight"] - want["norm_out.linear.weight"]).abs().max()) > 1e-2
    merge(F.save_pipeline(model, tmp_path / "p"), [path], tmp_path / "out")
    close(_weights(tmp_path / "out"), want)


def test_diffusers_applies_nothing_of_a_kohya_sd3_file(models, tmp_path):
    """What docs/formats.md says: StableDiffusion3Pipeline loads a kohya SD3 file without error and changes nothing
    (so sd-scripts' rule is the reference); the same file converted by loratools to diffusers loads and applies."""
    F, model = S.SD3, models["sd3"]
    lora = F.lora(model, "kohya", alphas="all")
    path = tmp_path / "k.safetensors"
    save_file(lora, str(path))
    try:
        after = fused(F.diffusers_fused(copy.deepcopy(model), path))
        before = model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)
    except (KeyError, ValueError, RuntimeError):
        pass
    out = save_adapter(load_adapter(path), tmp_path / "d", format="diffusers")
    theirs = F.diffusers_fused(copy.deepcopy(model), out / "pytorch_lora_weights.safetensors")
    close(fused(theirs), F.trainer_merge(model, lora))


def test_merge_into_transformer_folder(family, tmp_path):
    F, model, pipe = family
    lora = F.lora(model, "kohya")
    save_file(lora, str(tmp_path / "k.safetensors"))
    merge(pipe / "transformer", [tmp_path / "k.safetensors"], tmp_path / "out")
    close(load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors")), F.trainer_merge(model, lora))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("layout", ["kohya", "comfyui", "original", "diffusers"])
def test_merge_into_original_layout_file(family, tmp_path, prefix, layout):
    """An SAI SD3.5 / Tencent HunyuanVideo / ComfyUI single file: merged under its own (fused) names; read back
    through the names diffusers' converters take, it equals the pipeline merge, weights and outputs."""
    F, model, pipe = family
    base = tmp_path / "base.safetensors"
    save_file(F.to_original(model.state_dict(), prefix), str(base))
    path = tmp_path / "lora.safetensors"
    if layout == "diffusers":
        _diffusers_file(model, path)
        merge(pipe, [path], tmp_path / "want")
        want = _weights(tmp_path / "want")
    else:
        lora = F.lora(model, layout)
        save_file(lora, str(path))
        want = F.trainer_merge(model, lora)
    out = tmp_path / "merged.safetensors"
    merge(base, [path], out)
    merged = load_file(str(out))
    assert set(merged) == set(load_file(str(base)))
    close(F.from_original(merged), want)
    ours, reference = F.model(), F.model()
    ours.load_state_dict(F.from_original(merged))
    reference.load_state_dict(want)
    assert float((F.forward(ours) - F.forward(reference)).abs().max()) <= 1e-4


def _adapter_equal(a, b) -> None:
    assert set(a.modules) == set(b.modules)
    for k, m in a.modules.items():
        assert torch.allclose(m.delta(), b.modules[k].delta(), atol=1e-6, rtol=0), k


@pytest.mark.parametrize("start", ["kohya", "comfyui", "original", "diffusers"])
def test_convert_between_layouts_is_lossless(family, tmp_path, start):
    F, model, _ = family
    path = tmp_path / "start.safetensors"
    if start == "diffusers":
        _diffusers_file(model, path)
    else:
        save_file(F.lora(model, start), str(path))
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
    if start == "diffusers":  # fused block-diagonally then split: each part's own rank and A come back, its B
        a = load_file(str(path))  # with its scale folded in where the parts' scales differed (one alpha per fused
        b = load_file(str(diff / "pytorch_lora_weights.safetensors"))  # module)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if ".lora_A." in k)


def test_converted_files_load_back_in_diffusers_with_nothing_left_over(family, tmp_path):
    """kohya -> diffusers and -> ComfyUI (HunyuanVideo: the diffusion_model. lora_A/B names its converter reads):
    diffusers binds every module and fuses to what the trainers' rule gives."""
    F, model, _ = family
    modules = [n for n in F.linears(model) if F.name == "sd3" or _hv_diffusers_ok(n)]
    lora = F.lora(model, "kohya", modules, alphas="all")
    src = tmp_path / "src.safetensors"
    save_file(lora, str(src))
    want = F.trainer_merge(model, lora)
    out = save_adapter(load_adapter(src), tmp_path / "out", format="diffusers")
    theirs = F.diffusers_fused(copy.deepcopy(model), out / "pytorch_lora_weights.safetensors")
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in theirs.named_parameters() if ".lora_A." in n}
    assert lora_layers == {k.removeprefix("transformer.") for k in load_adapter(src).modules}
    close(fused(theirs), want)


def test_info_names_family_and_layout(family, tmp_path):
    from click.testing import CliRunner

    from loratools.cli.main import cli

    F, model, _ = family
    for layout, want in (("kohya", "kohya"), ("comfyui", "comfyui"), ("original", "original")):
        path = tmp_path / f"{layout}.safetensors"
        save_file(F.lora(model, layout), str(path))
        r = CliRunner().invoke(cli, ["info", str(path), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["dit"] == {"family": F.name, "layout": want, "label": LABELS[F.name]}


def test_sd3_text_encoders_resolve_against_the_pipeline(models, tmp_path):
    """sd-scripts' lora_te1_/lora_te2_/lora_te3_ are SD3's CLIP-L, CLIP-G and T5 (text_encoder, _2, _3)."""
    from loratools.formats.dit.flux_io import kohya_text_name, text_prefix

    assert text_prefix("sd3") == {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                                  "lora_te3_": "text_encoder_3"}  # fmt: skip
    assert kohya_text_name("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "sd3") == (
        "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    )
    F, model = S.SD3, models["sd3"]
    lora = F.lora(model, "kohya", ["joint_blocks.0.x_block.attn.qkv"])
    lora["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(2, 8)
    lora["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(8, 2)
    save_file(lora, str(tmp_path / "k.safetensors"))
    adapter = load_adapter(tmp_path / "k.safetensors")
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in adapter.modules
    back = load_file(str(save_adapter(adapter, tmp_path / "k2.safetensors", format="kohya")))
    assert torch.equal(back["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"],
                       lora["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"])  # fmt: skip


def test_an_attention_only_musubi_file_is_told_by_its_metadata_or_base(models, pipelines, tmp_path):
    """kohya names of HunyuanVideo's attention and single-block linears are Flux's too
    (lora_unet_double_blocks_0_img_attn_qkv): musubi's modelspec.architecture or the base tells the family; into a
    HunyuanVideo single file it merges under the file's own names."""
    F, model = S.HV, models["hunyuan_video"]
    attention = re.compile(r"^(double_blocks\.\d+\.(img|txt)_attn_(qkv|proj)|single_blocks\.\d+\.linear[12])$")
    lora = F.lora(model, "kohya", [n for n in F.linears(model) if attention.match(n)])
    assert not any("mlp" in k or "_mod_" in k for k in lora)
    plain, tagged = tmp_path / "plain.safetensors", tmp_path / "tagged.safetensors"
    save_file(lora, str(plain))
    save_file(lora, str(tagged), metadata={"modelspec.architecture": "hunyuan-video/lora"})
    assert load_adapter(plain).meta["dit"]["family"] == "flux"  # the names alone: Flux's
    assert load_adapter(tagged).meta["dit"] == {"family": "hunyuan_video", "layout": "kohya"}
    base = tmp_path / "hv.safetensors"
    save_file(F.to_original(model.state_dict(), "model.diffusion_model."), str(base))
    want = F.trainer_merge(model, lora)
    for i, path in enumerate((plain, tagged)):
        merge(base, [path], tmp_path / f"m{i}.safetensors")
        close(F.from_original(load_file(str(tmp_path / f"m{i}.safetensors"))), want)
        merge(pipelines["hunyuan_video"], [path], tmp_path / f"p{i}")
        close(_weights(tmp_path / f"p{i}"), want)


def test_a_diffusers_attention_only_sd3_file_merges_into_a_single_file(models, pipelines, tmp_path):
    """diffusers' SD3 DreamBooth script trains the joint attention only: names Flux shares, no SD3 marker. Into an
    SD3.5 single file the base tells the family, and the merge is the pipeline merge."""
    import dit_support

    F, model = S.SD3, models["sd3"]
    tensors, config = dit_support.diffusers_flux(model)
    keep = {k: v for k, v in tensors.items() if ".attn." in k and "norm" not in k}
    path = tmp_path / "d.safetensors"
    save_file(keep, str(path), metadata={"lora_adapter_metadata": json.dumps(
        {f"transformer.{k}": v for k, v in config.items()})})  # fmt: skip
    assert load_adapter(path).meta["dit"] is None  # the names alone tell no family
    base = tmp_path / "sd3.safetensors"
    save_file(F.to_original(model.state_dict()), str(base))
    merge(pipelines["sd3"], [path], tmp_path / "want")
    merge(base, [path], tmp_path / "m.safetensors")
    close(F.from_original(load_file(str(tmp_path / "m.safetensors"))), _weights(tmp_path / "want"))
    close(_weights(tmp_path / "want"), fused(F.diffusers_fused(copy.deepcopy(model), path)))


def test_merge_into_comfyui_fp8_scaled_single_file(family, tmp_path):
    """A ComfyUI fp8-scaled SD3.5 / HunyuanVideo single file (fp8 block weights + scale_weight): each fused weight
    dequantized as ComfyUI does, plus the trainers' update on it, to ≤1e-5 in fp32."""
    from comfy_fp8_support import dequantize, scaled_file

    F, model, _ = family
    prefix = "model.diffusion_model."
    raw = scaled_file(F.to_original(model.state_dict(), prefix), prefix)
    base = tmp_path / "fp8.safetensors"
    save_file(raw, str(base))
    lora = F.lora(model, "kohya")
    path = tmp_path / "k.safetensors"
    save_file(lora, str(path))
    merge(base, [path], tmp_path / "m.safetensors", dtype="fp32")
    merged = load_file(str(tmp_path / "m.safetensors"))
    by_kohya = {"lora_unet_" + k[len(prefix) : -len(".weight")].replace(".", "_"): k
                for k in raw if k.endswith(".weight")}  # fmt: skip
    deltas = {}
    for stem in {k.split(".", 1)[0] for k in lora}:
        down, up = lora[f"{stem}.lora_down.weight"], lora[f"{stem}.lora_up.weight"]
        alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else down.shape[0]
        deltas[by_kohya[stem]] = alpha / down.shape[0] * up @ down
    assert any(raw[k].dtype == torch.float8_e4m3fn for k in deltas)
    worst = 0.0
    for k, v in merged.items():
        scale = raw.get(k.removesuffix(".weight") + ".scale_weight")
        w = dequantize(raw[k], scale).to(torch.bfloat16).float() if scale is not None else raw[k].float()
        worst = max(worst, float((v.float() - (w + deltas[k] if k in deltas else w)).abs().max()))
    assert worst <= 1e-5, worst


def test_sd3_x_embedder_conv_lora(models, pipelines, tmp_path):
    """sd-scripts' emb_dims trains SD3's Conv2d x_embedder.proj (pos_embed.proj): down (r, in, k, k), up
    (out, r, 1, 1). Read, merged as its rule does (up·down reshaped), converted to diffusers and loaded there."""
    F, model = S.SD3, models["sd3"]
    lora = F.lora(model, "kohya", ["joint_blocks.0.x_block.attn.qkv"], alphas="all")
    w = model.state_dict()["pos_embed.proj.weight"]
    g = torch.Generator().manual_seed(9)
    lora["lora_unet_x_embedder_proj.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=g)
    lora["lora_unet_x_embedder_proj.lora_up.weight"] = torch.randn(w.shape[0], 2, 1, 1, generator=g)
    lora["lora_unet_x_embedder_proj.alpha"] = torch.tensor(3.0)
    path = tmp_path / "k.safetensors"
    save_file(lora, str(path))
    adapter = load_adapter(path)
    assert adapter.modules["transformer.pos_embed.proj"].kind == "conv"
    conv = {k: v for k, v in lora.items() if "x_embedder" not in k}
    want = F.trainer_merge(model, conv)
    down, up = lora["lora_unet_x_embedder_proj.lora_down.weight"], lora["lora_unet_x_embedder_proj.lora_up.weight"]
    want["pos_embed.proj.weight"] = w + 1.5 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    merge(pipelines["sd3"], [path], tmp_path / "out")
    close(_weights(tmp_path / "out"), want)
    back = load_file(str(save_adapter(adapter, tmp_path / "k2.safetensors", format="kohya")))
    assert all(torch.equal(back[k], v) for k, v in lora.items())
    out = save_adapter(adapter, tmp_path / "d", format="diffusers")
    close(fused(F.diffusers_fused(copy.deepcopy(model), out / "pytorch_lora_weights.safetensors")), want)
