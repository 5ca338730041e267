"""Z-Image, Lumina2, Chroma and HiDream LoRAs in the layouts their trainers write: read, merged into a pipeline /
transformer folder / original-layout single file, converted between layouts — against diffusers' own loaders
(``<Pipeline>.lora_state_dict`` + ``load_lora_adapter`` + ``fuse_lora``) where diffusers reads the file, and against
the trainers' rule (W += alpha/rank · B·A on the original weight; ComfyUI, musubi-tuner) where it does not
(issue 21)."""

from __future__ import annotations

import copy
import json
import re

import nextdit_support as S
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import load_adapter, merge, save_adapter
from loratools.formats.dit.layouts import LABELS

NAMES = list(S.FAMILIES)
#: (family, layout, alphas, leave out) that diffusers 0.42.1 reads right at the tiny width: its Z-Image converter
#: reads musubi/ai-toolkit names with or without alphas; its Lumina2 converter hard-codes 2304/768 rows (checked
#: at full width below); its HiDream converter takes ``diffusion_model.`` without alphas; Chroma goes through
#: Flux's kohya converter, which knows no distilled_guidance_layer, hard-codes linear1's 3072-wide rows
#: and applies nothing to Chroma's img_in, txt_in and final_layer.linear (below)
DIFFUSERS_OK = [
    ("z_image", "kohya", "some", ""), ("z_image", "comfyui", "some", ""), ("z_image", "aitoolkit", "none", ""),
    ("hidream", "aitoolkit", "none", ""),
    ("chroma", "kohya", "all", "distilled_guidance_layer|single_blocks|img_in|txt_in|final_layer"),
]  # fmt: skip
TRAINER = [(n, layout) for n in NAMES for layout in ("kohya", "comfyui", "original")]


@pytest.fixture(scope="module")
def models():
    return {name: F.model() for name, F in S.FAMILIES.items()}


@pytest.fixture(scope="module")
def pipelines(models, tmp_path_factory):
    return {n: S.FAMILIES[n].save_pipeline(m, tmp_path_factory.mktemp(n) / "pipe") for n, m in models.items()}


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def _lora(F, model, layout, alphas="some", leave_out="", **kw) -> dict[str, torch.Tensor]:
    lora = F.lora(model, layout, alphas=alphas, **kw)
    return {k: v for k, v in lora.items() if not leave_out or not re.search(leave_out, k)}


def _diffusers_file(model, path, metadata: bool = True) -> None:
    import dit_support

    tensors, config = dit_support.diffusers_flux(model)
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(tensors, str(path), metadata=meta if metadata else None)


@pytest.mark.parametrize("name", NAMES)
def test_the_lora_moves_the_weights_far_beyond_the_tolerance(models, tmp_path, name):
    F, model = S.FAMILIES[name], models[name]
    path = tmp_path / "d.safetensors"
    _diffusers_file(model, path)
    theirs = S.fused(F.diffusers_fused(copy.deepcopy(model), path))
    before = model.state_dict()
    assert min(float((theirs[k] - before[k]).abs().max()) for k in before if k.endswith("weight")
               and not k.endswith(("norm.weight", "norm_q.weight", "norm_k.weight"))
               and (theirs[k] != before[k]).any()) > 100 * 1e-5  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_merged_outputs_equal_diffusers_with_the_lora_active(models, pipelines, tmp_path, name):
    """The transformer merged by loratools gives the output diffusers' model gives with the LoRA loaded (not
    fused) to ≤1e-4, and the LoRA moves that output far beyond the tolerance."""
    import diffusers

    F, model = S.FAMILIES[name], models[name]
    path = tmp_path / "d.safetensors"
    _diffusers_file(model, path)
    theirs = F.forward(F.diffusers_fused(copy.deepcopy(model), path))
    assert float((theirs - F.forward(model)).abs().max()) > 100 * 1e-4
    merge(pipelines[name], [path], tmp_path / "out")
    ours = getattr(diffusers, F.transformer).from_pretrained(tmp_path / "out" / "transformer").eval()
    assert float((F.forward(ours) - theirs).abs().max()) <= 1e-4


@pytest.mark.parametrize(("name", "layout", "alphas", "leave_out"), DIFFUSERS_OK)
def test_merge_into_pipeline_equals_diffusers(models, pipelines, tmp_path, name, layout, alphas, leave_out):
    F, model = S.FAMILIES[name], models[name]
    path = tmp_path / f"{layout}.safetensors"
    save_file(_lora(F, model, layout, alphas, leave_out), str(path))
    family = "flux" if leave_out else name  # Chroma's blocks are Flux's: without its guidance layer it reads as Flux
    assert load_adapter(path).meta["dit"] == {"family": family, "layout": {"aitoolkit": "comfyui"}.get(layout, layout)}
    merge(pipelines[name], [path], tmp_path / "out")
    S.close(_weights(tmp_path / "out"), S.fused(F.diffusers_fused(copy.deepcopy(model), path)))


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_layout_equals_diffusers(models, pipelines, tmp_path, name):
    F, model = S.FAMILIES[name], models[name]
    for metadata in (True, False):
        path = tmp_path / f"d{metadata}.safetensors"
        _diffusers_file(model, path, metadata)
        assert load_adapter(path).meta["dit"] == {"family": name, "layout": "diffusers"}
        merge(pipelines[name], [path], tmp_path / f"out{metadata}")
        S.close(_weights(tmp_path / f"out{metadata}"), S.fused(F.diffusers_fused(copy.deepcopy(model), path)))


def test_diffusers_applies_nothing_to_chromas_top_level_modules(models, tmp_path):
    """What docs/formats.md says: diffusers 0.42.1 loads a kohya Chroma file's img_in/txt_in/final_layer.linear and
    leaves those weights as they were; loratools merges them by the trainers' rule."""
    F, model = S.CHROMA, models["chroma"]
    lora = _lora(F, model, "kohya", "all", "distilled_guidance_layer|single_blocks")
    path = tmp_path / "k.safetensors"
    save_file(lora, str(path))
    theirs, before = S.fused(F.diffusers_fused(copy.deepcopy(model), path)), model.state_dict()
    for k in ("x_embedder.weight", "context_embedder.weight", "proj_out.weight"):
        assert torch.equal(theirs[k], before[k]), k
    merge(S.CHROMA.save_pipeline(model, tmp_path / "pipe"), [path], tmp_path / "out")
    S.close(_weights(tmp_path / "out"), F.trainer_merge(model, lora))


@pytest.mark.parametrize(("name", "layout"), TRAINER)
def test_every_module_follows_the_trainers_rule(models, pipelines, tmp_path, name, layout):
    """Every module (top-level ones, some without an alpha), into the pipeline and into its transformer folder."""
    F, model = S.FAMILIES[name], models[name]
    lora = _lora(F, model, layout)
    path = tmp_path / "all.safetensors"
    save_file(lora, str(path))
    want = F.trainer_merge(model, lora)
    merge(pipelines[name], [path], tmp_path / "out")
    S.close(_weights(tmp_path / "out"), want)
    merge(pipelines[name] / "transformer", [path], tmp_path / "out2")
    S.close(load_file(str(tmp_path / "out2" / "diffusion_pytorch_model.safetensors")), want)


@pytest.mark.parametrize("name", ["z_image"])
@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_fused_qkv_names_are_read(models, pipelines, tmp_path, name, layout):
    """Z-Image files in ComfyUI's own (NextDiT) names: attention.qkv split in thirds, attention.out, final_layer."""
    F, model = S.FAMILIES[name], models[name]
    lora = _lora(F, model, layout, fused=True)
    assert any("attention.qkv" in k or "attention_qkv" in k for k in lora)
    path = tmp_path / "f.safetensors"
    save_file(lora, str(path))
    merge(pipelines[name], [path], tmp_path / "out")
    S.close(_weights(tmp_path / "out"), F.trainer_merge(model, lora))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers", "fused"])
def test_merge_into_original_layout_file(models, tmp_path, name, prefix, layout):
    """A ComfyUI single file (fused qkv, its own names): merged under its names, equal to the trainers' rule / the
    pipeline merge."""
    F, model = S.FAMILIES[name], models[name]
    if layout == "fused" and F.split_files is False:
        pytest.skip("the family's kohya files are fused already")
    base = tmp_path / "base.safetensors"
    save_file(F.to_native(model.state_dict(), prefix), str(base))
    path = tmp_path / "lora.safetensors"
    if layout == "diffusers":
        _diffusers_file(model, path)
        want = S.fused(F.diffusers_fused(copy.deepcopy(model), path))
    else:
        lora = _lora(F, model, "kohya" if layout == "fused" else layout, fused=True if layout == "fused" else None)
        save_file(lora, str(path))
        want = F.trainer_merge(model, lora)
    out = tmp_path / "merged.safetensors"
    merge(base, [path], out)
    merged = load_file(str(out))
    assert set(merged) == set(load_file(str(base)))
    S.close(F.from_native({k.removeprefix(prefix): v for k, v in merged.items()}, model), want)


def _adapter_equal(a, b) -> None:
    assert set(a.modules) == set(b.modules)
    for k, m in a.modules.items():
        assert torch.allclose(m.delta(), b.modules[k].delta(), atol=1e-6, rtol=0), k


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("start", ["kohya", "comfyui", "original", "diffusers"])
def test_convert_between_layouts_is_lossless(models, tmp_path, name, start):
    F, model = S.FAMILIES[name], models[name]
    path = tmp_path / "start.safetensors"
    if start == "diffusers":
        _diffusers_file(model, path)
    else:
        save_file(_lora(F, model, start), str(path))
    first = load_adapter(path)
    kohya = save_adapter(first, tmp_path / "k.safetensors", format="kohya")
    comfy = save_adapter(load_adapter(kohya), tmp_path / "c.safetensors", format="comfyui")
    diff = save_adapter(load_adapter(comfy), tmp_path / "d", format="diffusers")
    back = save_adapter(load_adapter(diff), tmp_path / "k2.safetensors", format="kohya")
    for p in (kohya, comfy, diff, back):
        _adapter_equal(load_adapter(p), first)
    a, b = load_file(str(kohya)), load_file(str(back))  # a fused alpha refolded may differ in its last bits
    assert set(a) == set(b) and all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-6, atol=0) for k in a)
    if start == "kohya":  # the trainer's file written back as it was
        src = load_file(str(path))
        assert set(src) <= set(a) and all(torch.equal(src[k], a[k]) for k in src)


@pytest.mark.parametrize(("name", "fmt"), [("z_image", "kohya"), ("z_image", "comfyui"), ("z_image", "diffusers"),
                                           ("lumina2", "diffusers"), ("hidream", "diffusers"),
                                           ("chroma", "diffusers")])  # fmt: skip
def test_converted_files_load_back_in_diffusers_with_nothing_left_over(models, tmp_path, name, fmt):
    F, model = S.FAMILIES[name], models[name]
    src = tmp_path / "src.safetensors"
    save_file(_lora(F, model, "kohya", "all"), str(src))
    out = save_adapter(load_adapter(src), tmp_path / ("out" if fmt == "diffusers" else "out.safetensors"), format=fmt)
    file = out / "pytorch_lora_weights.safetensors" if fmt == "diffusers" else out
    theirs = F.diffusers_fused(copy.deepcopy(model), file)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in theirs.named_parameters() if ".lora_A." in n}
    assert lora_layers == set(F.linears(model))
    S.close(S.fused(theirs), F.trainer_merge(model, load_file(str(src))))


@pytest.mark.parametrize("name", NAMES)
def test_info_names_family_and_layout(models, tmp_path, name):
    from click.testing import CliRunner

    from loratools.cli.main import cli

    F, model = S.FAMILIES[name], models[name]
    path = tmp_path / "k.safetensors"
    save_file(_lora(F, model, "kohya"), str(path))
    r = CliRunner().invoke(cli, ["info", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dit"] == {"family": name, "layout": "kohya", "label": LABELS[name]}


def test_lumina2_at_full_width_equals_diffusers_converter(tmp_path):
    """diffusers' ``_convert_non_diffusers_lumina2_lora_to_diffusers`` hard-codes Lumina-Image 2.0's widths (q 2304
    rows, k/v 768: grouped-query attention): at that width, a ComfyUI-layout file (lora_A/B, no alpha, as that
    converter wants) read by loratools gives its very factors, on every block kind."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    g, hidden, rank, state = torch.Generator().manual_seed(0), 2304, 2, {}
    rows = {"attention.qkv": 3840, "attention.out": hidden, "feed_forward.w1": 6144, "feed_forward.w2": hidden,
            "feed_forward.w3": 6144, "adaLN_modulation.1": 4 * hidden}  # fmt: skip
    for block in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"):
        for inner, out in rows.items():
            if block.startswith("context_refiner") and inner.startswith("adaLN"):
                continue  # the context refiner has no modulation
            width = 6144 if inner == "feed_forward.w2" else hidden
            state[f"diffusion_model.{block}.{inner}.lora_A.weight"] = torch.randn(rank, width, generator=g)
            state[f"diffusion_model.{block}.{inner}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    path = tmp_path / "full.safetensors"
    save_file(state, str(path))
    theirs = _convert_non_diffusers_lumina2_lora_to_diffusers(dict(state))
    ours = load_adapter(path)
    assert ours.meta["dit"] == {"family": "lumina2", "layout": "comfyui"}
    assert {k.rsplit(".lora_", 1)[0] for k in theirs} == set(ours.modules)
    for name, m in ours.modules.items():
        assert m.scale == 1.0
        assert torch.equal(m.down, theirs[f"{name}.lora_A.weight"])
        assert torch.equal(m.up, theirs[f"{name}.lora_B.weight"])


def test_the_test_names_are_diffusers_own(models):
    """The native names nextdit_support writes are what diffusers' single-file converters take back: Z-Image's at
    the tiny width, Lumina2's (which hard-codes 2304/768) at full width on the meta device."""
    import diffusers
    from diffusers.loaders.single_file_utils import (
        convert_lumina2_to_diffusers,
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    state = models["z_image"].state_dict()
    back = convert_z_image_transformer_checkpoint_to_diffusers(S.Z_IMAGE.to_native(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    with torch.device("meta"):
        full = diffusers.Lumina2Transformer2DModel(num_layers=1, num_refiner_layers=1)
    state = full.state_dict()
    linears = {f"{n}.{leaf}" for n in S.LUMINA2.linears(full) for leaf in ("weight", "bias")} & set(state)
    native = {}
    for k in linears:
        mod, _, leaf = k.rpartition(".")
        orig, part = S.LUMINA2.native(mod)
        native.setdefault(f"{orig}.{leaf}", []).append((part, state[k]))
    native = {k: torch.cat([t for _, t in sorted(v, key=lambda p: p[0])]) for k, v in native.items()}
    back = convert_lumina2_to_diffusers(native)
    assert set(back) == linears and all(back[k].shape == state[k].shape for k in linears)


#: ComfyUI-GGUF's general.architecture for each family (Z-Image runs as its Lumina2 model, Chroma as Flux)
GGUF_ARCH = {"z_image": "lumina2", "lumina2": "lumina2", "hidream": "hidream", "chroma": "flux"}


@pytest.mark.parametrize("name", NAMES)
def test_merge_into_gguf_and_fp8_scaled_single_files(models, tmp_path, name):
    """A ComfyUI-GGUF F16 file merges to exactly the safetensors single-file merge's values; a ComfyUI fp8-scaled
    file to dequantized weights + the trainers' update, within bf16's rounding (the written type)."""
    import comfy_fp8_support as C
    import gguf_dit_support as G

    F, model = S.FAMILIES[name], models[name]
    native = {k: v.half() for k, v in F.to_native(model.state_dict()).items()}
    save_file(native, str(tmp_path / "base.safetensors"))
    lora = _lora(F, model, "kohya")
    save_file(lora, str(tmp_path / "l.safetensors"))
    merge(tmp_path / "base.safetensors", [tmp_path / "l.safetensors"], tmp_path / "m.safetensors")
    want = load_file(str(tmp_path / "m.safetensors"))
    G.write_comfy_gguf(native, tmp_path / "base.gguf", GGUF_ARCH[name], target=None)
    merge(tmp_path / "base.gguf", [tmp_path / "l.safetensors"], tmp_path / "m.gguf")
    got = G.comfy_state(tmp_path / "m.gguf")[0]
    assert set(got) == set(want) and all(torch.equal(got[k], want[k].float()) for k in want)

    prefix = "model.diffusion_model."
    scaled = C.scaled_file({prefix + k: v.float() for k, v in native.items()}, only_blocks=False)
    save_file(scaled, str(tmp_path / "fp8.safetensors"))
    merge(tmp_path / "fp8.safetensors", [tmp_path / "l.safetensors"], tmp_path / "m8.safetensors")
    merged = {k.removeprefix(prefix): v for k, v in load_file(str(tmp_path / "m8.safetensors")).items()}
    dequantized = copy.deepcopy(model)
    dequantized.load_state_dict(F.from_native({k.removeprefix(prefix): v for k, v in
                                               C.dequantized_state(scaled).items()}, model))  # fmt: skip
    S.close(F.from_native({k: v.float() for k, v in merged.items() if k != "scaled_fp8"}, model),
            F.trainer_merge(dequantized, lora), atol=2e-2)  # fmt: skip


def test_fused_only_names_are_told_lumina2_by_shape_or_base(models, pipelines, tmp_path):
    """A ComfyUI file on the fused attention alone (names Lumina2 and Z-Image share): Lumina2 when its qkv is not
    three equal parts (GQA) or the base is a Lumina2 one; else Z-Image."""
    F, model = S.LUMINA2, models["lumina2"]
    lora = _lora(F, model, "comfyui", modules=["layers.0.attention.qkv", "layers.1.attention.out"])
    path = tmp_path / "attn.safetensors"
    save_file(lora, str(path))
    assert load_adapter(path).meta["dit"]["family"] == "lumina2"  # qkv of 64 rows for 32 inputs
    merge(pipelines["lumina2"], [path], tmp_path / "out")
    S.close(_weights(tmp_path / "out"), F.trainer_merge(model, lora))
    out = {k: v for k, v in lora.items() if "attention.out" in k}  # no qkv: only the base can tell
    save_file(out, str(tmp_path / "out.safetensors"))
    assert load_adapter(tmp_path / "out.safetensors").meta["dit"]["family"] == "z_image"
    merge(pipelines["lumina2"], [tmp_path / "out.safetensors"], tmp_path / "out2")
    S.close(_weights(tmp_path / "out2"), F.trainer_merge(model, out))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("fused", [False, True])
def test_z_image_into_a_single_file_in_tongyis_names(models, tmp_path, prefix, fused):
    """A Z-Image single file in Tongyi's/diffusers' names (attention.to_q, all_x_embedder.2-1: Comfy-Org's fp8
    files hold these): merged under its own names, from musubi's split names and from ComfyUI's fused ones."""
    F, model = S.Z_IMAGE, models["z_image"]
    base = tmp_path / "base.safetensors"
    save_file({prefix + k: v for k, v in model.state_dict().items()}, str(base))
    lora = _lora(F, model, "kohya", fused=fused)
    save_file(lora, str(tmp_path / "l.safetensors"))
    merge(base, [tmp_path / "l.safetensors"], tmp_path / "m.safetensors")
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert set(merged) == set(load_file(str(base)))
    S.close({k.removeprefix(prefix): v for k, v in merged.items()}, F.trainer_merge(model, lora))
