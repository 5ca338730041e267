"""Wan (2.1/2.2) and Qwen-Image LoRAs in every layout their trainers write: read, merged into a pipeline / transformer
folder / original-layout single file, converted between layouts — against diffusers' own loaders (WanPipeline /
QwenImagePipeline.lora_state_dict + load_lora_adapter + fuse_lora) where diffusers reads the file, and against the
trainers' rule (W += alpha/rank · B·A on the original weight; musubi-tuner, ComfyUI) where it does not (issue 21)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import wan_qwen_support as S
from safetensors.torch import load_file, save_file

from loratools import load_adapter, merge, save_adapter
from loratools.formats.dit.layouts import LABELS

FAMILIES = {"wan": S.WAN, "qwen_image": S.QWEN}


def _blocks(F, model) -> list[str]:
    return [n for n in F.linears(model) if n.startswith(("blocks.", "transformer_blocks."))]


#: (family, layout, alphas, block modules only) that diffusers 0.42 reads right: its musubi Wan converter wants an
#: alpha on every module of every block and nothing else; its Wan ``diffusion_model.`` converter refuses alphas
#: on the top-level modules; it applies nothing from bare (DiffSynth) Wan names
DIFFUSERS_OK = [
    ("wan", "kohya", "all", True), ("wan", "comfyui", "blocks", False), ("wan", "aitoolkit", "blocks", False),
    ("qwen_image", "kohya", "some", False), ("qwen_image", "comfyui", "some", False),
    ("qwen_image", "aitoolkit", "none", False), ("qwen_image", "original", "some", False),
]  # fmt: skip
#: what the trainers write that diffusers refuses or ignores: every module, some without an alpha
TRAINER_ONLY = [
    ("wan", "kohya"), ("wan", "comfyui"), ("wan", "original"), ("qwen_image", "original"),
]  # fmt: skip


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    F = FAMILIES[request.param]
    return F, F.model()


@pytest.fixture(scope="module")
def models():
    return {name: F.model() for name, F in FAMILIES.items()}


@pytest.fixture(scope="module")
def pipelines(models, tmp_path_factory):
    return {n: FAMILIES[n].save_pipeline(m, tmp_path_factory.mktemp(n) / "pipe") for n, m in models.items()}


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def _lora(F, model, layout: str, alphas: str = "some", blocks_only: bool = False, **kw) -> dict[str, torch.Tensor]:
    return F.lora(model, layout, _blocks(F, model) if blocks_only else None, alphas=alphas, **kw)


def _diffusers_file(F, model, path, metadata: bool = True):
    """A diffusers-layout LoRA on every Linear (the Flux tests' generator is generic), alphas per module."""
    import dit_support

    tensors, config = dit_support.diffusers_flux(model)
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(tensors, str(path), metadata=meta if metadata else None)
    return tensors


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_lora_moves_the_output_far_beyond_the_tolerance(models, tmp_path, name):
    F, model = FAMILIES[name], models[name]
    path = tmp_path / "k.safetensors"
    save_file(_lora(F, model, "kohya", "all", blocks_only=True), str(path))
    moved = F.forward(F.diffusers_fused(copy.deepcopy(model), path)) - F.forward(model)
    assert float(moved.abs().max()) > 100 * 1e-4


@pytest.mark.parametrize(("name", "layout", "alphas", "blocks_only"), DIFFUSERS_OK)
def test_merge_into_pipeline_equals_diffusers(models, pipelines, tmp_path, name, layout, alphas, blocks_only):
    F, model = FAMILIES[name], models[name]
    path = tmp_path / f"{layout}.safetensors"
    save_file(_lora(F, model, layout, alphas, blocks_only), str(path))
    want_layout = {"aitoolkit": "comfyui"}.get(layout, layout)
    assert load_adapter(path).meta["dit"] == {"family": name, "layout": want_layout}
    merge(pipelines[name], [path], tmp_path / "out")
    theirs = F.diffusers_fused(copy.deepcopy(model), path)
    out_theirs = F.forward(theirs)
    S.close(_weights(tmp_path / "out"), S.fused(theirs))
    import diffusers

    ours = getattr(diffusers, F.transformer).from_pretrained(tmp_path / "out" / "transformer").eval()
    assert float((F.forward(ours) - out_theirs).abs().max()) <= 1e-4


@pytest.mark.parametrize(("name", "layout"), TRAINER_ONLY)
def test_every_module_follows_the_trainers_rule(models, pipelines, tmp_path, name, layout):
    """Top-level modules, modules without an alpha, bare names: what diffusers refuses or applies nothing of."""
    F, model = FAMILIES[name], models[name]
    lora = _lora(F, model, layout, "some" if name == "wan" else "none")
    path = tmp_path / "all.safetensors"
    save_file(lora, str(path))
    merge(pipelines[name], [path], tmp_path / "out")
    S.close(_weights(tmp_path / "out"), F.trainer_merge(model, lora))
    try:  # what diffusers does with the same file (docs/formats.md says so)
        after = S.fused(F.diffusers_fused(copy.deepcopy(model), path))
    except (KeyError, IndexError, ValueError):
        return
    before = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # loaded, and nothing changed


def test_diffusers_layout_with_and_without_metadata(family, tmp_path):
    F, model = family
    pipe = F.save_pipeline(model, tmp_path / "pipe")
    for metadata in (True, False):
        path = tmp_path / f"d{metadata}.safetensors"
        _diffusers_file(F, model, path, metadata)
        assert load_adapter(path).meta["dit"] == {"family": F.name, "layout": "diffusers"}
        merge(pipe, [path], tmp_path / f"out{metadata}")
        S.close(_weights(tmp_path / f"out{metadata}"), S.fused(F.diffusers_fused(copy.deepcopy(model), path)))


def test_merge_into_transformer_folder(family, tmp_path):
    F, model = family
    pipe = F.save_pipeline(model, tmp_path / "pipe")
    lora = _lora(F, model, "kohya")
    save_file(lora, str(tmp_path / "k.safetensors"))
    merge(pipe / "transformer", [tmp_path / "k.safetensors"], tmp_path / "out")
    S.close(load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors")), F.trainer_merge(model, lora))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("layout", ["kohya", "comfyui", "original", "diffusers"])
def test_merge_into_original_layout_file(family, tmp_path, prefix, layout):
    """A Wan-AI / ComfyUI single file: merged under its own names; diffusers' single-file converter reads it back
    to the pipeline merge's weights and outputs."""
    F, model = family
    base = tmp_path / "base.safetensors"
    save_file(F.to_original(model.state_dict(), prefix), str(base))
    path = tmp_path / "lora.safetensors"
    if layout == "diffusers":
        _diffusers_file(F, model, path)
        pipe = F.save_pipeline(model, tmp_path / "pipe")
        merge(pipe, [path], tmp_path / "want")
        want = _weights(tmp_path / "want")
    else:
        lora = _lora(F, model, layout)
        save_file(lora, str(path))
        want = F.trainer_merge(model, lora)
    out = tmp_path / "merged.safetensors"
    merge(base, [path], out)
    merged = load_file(str(out))
    assert set(merged) == set(load_file(str(base)))
    S.close(F.from_original(merged), want)
    ours = F.model()
    ours.load_state_dict(F.from_original(merged))
    reference = F.model()
    reference.load_state_dict(want)
    assert float((F.forward(ours) - F.forward(reference)).abs().max()) <= 1e-4


def _adapter_equal(a, b) -> None:
    assert set(a.modules) == set(b.modules)
    for k, m in a.modules.items():
        assert torch.allclose(m.delta(), b.modules[k].delta(), atol=1e-6, rtol=0), k


@pytest.mark.parametrize("start", ["kohya", "comfyui", "aitoolkit", "original", "diffusers"])
def test_convert_between_layouts_is_lossless(family, tmp_path, start):
    F, model = family
    path = tmp_path / "start.safetensors"
    if start == "diffusers":
        _diffusers_file(F, model, path)
    else:
        save_file(_lora(F, model, start), str(path))
    first = load_adapter(path)
    kohya = save_adapter(first, tmp_path / "k.safetensors", format="kohya")
    comfy = save_adapter(load_adapter(kohya), tmp_path / "c.safetensors", format="comfyui")
    diff = save_adapter(load_adapter(comfy), tmp_path / "d", format="diffusers")
    back = save_adapter(load_adapter(diff), tmp_path / "k2.safetensors", format="kohya")
    for p in (kohya, comfy, diff, back):
        _adapter_equal(load_adapter(p), first)
    a, b = load_file(str(kohya)), load_file(str(back))  # nothing fused: the very tensors, alphas kept
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    if start == "kohya":
        src = load_file(str(path))
        assert all(torch.equal(src[k], a[k]) for k in src)
    if start == "diffusers":
        src, d = load_file(str(path)), load_file(str(diff / "pytorch_lora_weights.safetensors"))
        assert set(src) == set(d) and all(torch.equal(src[k], d[k]) for k in src)


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_converted_files_load_back_in_diffusers_with_nothing_left_over(family, tmp_path, fmt):
    F, model = family
    src = tmp_path / "src.safetensors"
    save_file(_lora(F, model, "kohya", "all", blocks_only=F.name == "wan"), str(src))
    out = save_adapter(load_adapter(src), tmp_path / ("out" if fmt == "diffusers" else "out.safetensors"), format=fmt)
    file = out / "pytorch_lora_weights.safetensors" if fmt == "diffusers" else out
    theirs = F.diffusers_fused(copy.deepcopy(model), file)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in theirs.named_parameters() if ".lora_A." in n}
    assert lora_layers == {k.removeprefix("transformer.") for k in load_adapter(src).modules}
    merge(F.save_pipeline(model, tmp_path / "p"), [src], tmp_path / "m")
    S.close(_weights(tmp_path / "m"), S.fused(theirs))


def test_wan22_two_transformers(tmp_path):
    """A Wan2.2 A14B-style pipeline (transformer = high noise, transformer_2 = low noise): a LoRA merged into the
    pipeline goes to transformer/ (as diffusers' load_lora_weights does), into transformer_2/ when that folder is
    the base; the other expert is left byte for byte."""
    F = S.WAN
    high, low = F.model(0), F.model(7)
    pipe = F.save_pipeline(high, tmp_path / "pipe", second=low)
    lora = _lora(F, high, "kohya")
    save_file(lora, str(tmp_path / "k.safetensors"))
    merge(pipe, [tmp_path / "k.safetensors"], tmp_path / "out")
    S.close(_weights(tmp_path / "out"), F.trainer_merge(high, lora))
    untouched = load_file(str(tmp_path / "out" / "transformer_2" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(untouched[k], v) for k, v in low.state_dict().items())
    merge(pipe / "transformer_2", [tmp_path / "k.safetensors"], tmp_path / "out2")
    S.close(load_file(str(tmp_path / "out2" / "diffusion_pytorch_model.safetensors")), F.trainer_merge(low, lora))


def test_the_wan_names_are_diffusers_own(models):
    """The test's Wan-AI names are exactly what diffusers' single-file converter takes back, and loratools' table
    (formats/dit/wan.py) maps every LoRA-bearing module the same way."""
    from loratools.formats.dit.wan import TABLE

    state = models["wan"].state_dict()
    back = S.WAN.from_original(S.WAN.to_original(state, "model.diffusion_model."))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    for name in S.WAN.linears(models["wan"]):
        assert TABLE.to_diffusers(S.wan_name(name)) == (name,), name
        assert TABLE.to_original(name) == (S.wan_name(name), 0, 1), name


def test_info_names_family_and_layout(family, tmp_path):
    from click.testing import CliRunner

    from loratools.cli.main import cli

    F, model = family
    path = tmp_path / "k.safetensors"
    save_file(_lora(F, model, "kohya"), str(path))
    r = CliRunner().invoke(cli, ["info", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dit"] == {"family": F.name, "layout": "kohya", "label": LABELS[F.name]}


@pytest.mark.parametrize(("name", "prefix", "adapter"), [
    ("wan", "diffusion_model.", ""), ("qwen_image", "diffusion_model.", ""), ("qwen_image", "", ".default"),
    ("qwen_image", "transformer.", ".default"),
])  # fmt: skip
def test_musubi_convert_lora_output_is_read(models, pipelines, tmp_path, name, prefix, adapter):
    """musubi-tuner's ``convert_lora.py --target other``: alpha folded into both factors (√(alpha/rank) each) and
    dropped, keys ``<--diffusers_prefix>.<module>.lora_A<.--diffusers_adapter_name>.weight``. It merges to what the
    kohya file it came from merges to, and as diffusers merges it — except ``transformer.`` + ``.default``, which
    diffusers 0.42.1 prefixes a second time (``transformer.transformer.img_in``) and then cannot load."""
    F, model = FAMILIES[name], models[name]
    kohya = _lora(F, model, "kohya", "all", blocks_only=name == "wan")
    by_kohya = {"lora_unet_" + n.replace(".", "_"): n for n in (F.original(m) for m in F.linears(model))}
    converted = {}
    for key, t in kohya.items():
        stem, _, part = key.partition(".")
        if part == "alpha":
            continue
        rank = kohya[f"{stem}.lora_down.weight"].shape[0]
        scale = (kohya[f"{stem}.alpha"] / rank).sqrt()
        role = "lora_A" if part == "lora_down.weight" else "lora_B"
        converted[f"{prefix}{by_kohya[stem]}.{role}{adapter}.weight"] = t * scale
    path = tmp_path / "other.safetensors"
    save_file(converted, str(path))
    merge(pipelines[name], [path], tmp_path / "out")
    ours = _weights(tmp_path / "out")
    S.close(ours, F.trainer_merge(model, kohya))
    if prefix == "transformer.":
        from peft.utils.error import NoMatchingPeftModuleError

        with pytest.raises(NoMatchingPeftModuleError):
            F.diffusers_fused(copy.deepcopy(model), path)
        return
    S.close(ours, S.fused(F.diffusers_fused(copy.deepcopy(model), path)))
