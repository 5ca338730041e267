"""XLabs Flux LoRAs (x-flux processor names) and BFL's control LoRAs (Canny/Depth: norm scales, a wider img_in):
read, merged into a pipeline and an original-layout single file, converted — against diffusers' own loaders
(``_convert_xlabs_flux_lora_to_diffusers``, ``_convert_bfl_flux_control_lora_to_diffusers`` at full width, the
control loader's x_embedder widening and norm loading + ``fuse_lora``) (issue 21)."""

from __future__ import annotations

import copy

import dit_support as S
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loratools import load_adapter, merge, save_adapter

D = S.D
#: x-flux processor LoRA -> (out, in) in the tiny model
XLABS = {
    "double_blocks.0.processor.qkv_lora1": (3 * D, D), "double_blocks.0.processor.qkv_lora2": (3 * D, D),
    "double_blocks.0.processor.proj_lora1": (D, D), "double_blocks.0.processor.proj_lora2": (D, D),
    "single_blocks.0.processor.qkv_lora": (3 * D, D), "single_blocks.0.processor.proj_lora": (D, 5 * D),
}  # fmt: skip
NORMS = ("double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_attn.norm.key_norm.scale",
         "double_blocks.0.txt_attn.norm.query_norm.scale", "double_blocks.0.txt_attn.norm.key_norm.scale",
         "single_blocks.0.norm.query_norm.scale", "single_blocks.0.norm.key_norm.scale")  # fmt: skip


def xlabs(prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (stem, (o, n)) in enumerate(XLABS.items()):
        r = 2 + i % 3
        out[f"{prefix}{stem}.down.weight"] = torch.randn(r, n, generator=g) * 0.3
        out[f"{prefix}{stem}.up.weight"] = torch.randn(o, r, generator=g) * 0.3
    return out


def control(model, width: int = 2 * 4, seed: int = 4) -> dict[str, torch.Tensor]:
    """A BFL control LoRA of the tiny model: every module (lora_A/lora_B, no alpha), img_in taking ``width`` inputs,
    the six q/k norm scales."""
    g = torch.Generator().manual_seed(seed)
    lora = {k: v for k, v in S.kohya_flux(model, layout="bfl", seed=seed).items() if not k.endswith(".alpha")}
    lora["img_in.lora_A.weight"] = torch.randn(lora["img_in.lora_B.weight"].shape[1], width, generator=g) * 0.3
    lora.update({k: 1 + torch.randn(8, generator=g) * 0.3 for k in NORMS})
    return lora


def _fused(model) -> dict[str, torch.Tensor]:
    model.fuse_lora()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def _close(ours: dict, theirs: dict, atol: float = 1e-5) -> None:
    assert set(ours) == set(theirs)
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    assert worst <= atol, worst


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


# -- XLabs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_merge_into_pipeline_equals_diffusers(model, pipeline, tmp_path, prefix):
    path = tmp_path / "xlabs.safetensors"
    save_file(xlabs(prefix), str(path))
    assert load_adapter(path).meta["dit"] == {"family": "flux", "layout": "xlabs"}
    theirs = S.diffusers_fused(copy.deepcopy(model), path)
    moved = S.forward(theirs) - S.forward(model)
    assert float(moved.abs().max()) > 100 * 1e-4  # the parity check: the LoRA moves the output far beyond 1e-4
    merge(pipeline, [path], tmp_path / "out")
    _close(_weights(tmp_path / "out"), _fused(theirs))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_xlabs_merge_into_original_layout_file(model, pipeline, tmp_path, prefix):
    """qkv_lora1/2 fuse back into img_attn/txt_attn.qkv; a single block's qkv_lora is linear1's q, k, v rows."""
    path = tmp_path / "xlabs.safetensors"
    save_file(xlabs(), str(path))
    base = tmp_path / "flux1.safetensors"
    save_file(S.to_bfl(model.state_dict(), prefix), str(base))
    merge(base, [path], tmp_path / "merged.safetensors")
    merge(pipeline, [path], tmp_path / "want")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert set(merged) == set(load_file(str(base)))
    _close(S.from_bfl(merged, prefix), _weights(tmp_path / "want"))


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_xlabs_converts_losslessly(model, tmp_path, fmt):
    path = tmp_path / "xlabs.safetensors"
    save_file(xlabs(), str(path))
    first = load_adapter(path)
    out = save_adapter(first, tmp_path / ("out" if fmt == "diffusers" else "out.safetensors"), format=fmt)
    back = load_adapter(out)
    assert set(back.modules) == set(first.modules)
    for k, m in first.modules.items():
        assert torch.allclose(m.delta(), back.modules[k].delta(), atol=1e-6, rtol=0), k
    if fmt != "diffusers":  # diffusers splits a kohya linear1 at 3072 rows: it cannot read a tiny one (test_flux)
        return
    theirs = S.diffusers_fused(copy.deepcopy(model), out / "pytorch_lora_weights.safetensors")  # every module binds
    bound = {n.rsplit(".lora_A", 1)[0] for n, _ in theirs.named_parameters() if ".lora_A." in n}
    assert bound == {k.removeprefix("transformer.") for k in first.modules}


# -- BFL control ---------------------------------------------------------------------------------------------------
def test_control_names_equal_diffusers_converter_at_full_width(tmp_path):
    """diffusers' converter hard-codes 19/38 blocks of width 3072: a rank-1 file of that shape, read by both."""
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    from loratools.formats.dit import flux

    g = torch.Generator().manual_seed(0)
    w, sd = 3072, {}
    mods = [f"double_blocks.{i}.{p}" for i in range(19) for p in flux.DOUBLE] + [
        f"single_blocks.{i}.{p}" for i in range(38) for p in flux.SINGLE] + list(flux.TOP)  # fmt: skip
    rows = {"img_attn.qkv": 3 * w, "txt_attn.qkv": 3 * w, "img_mlp.0": 4 * w, "txt_mlp.0": 4 * w, "mod.lin": 6 * w,
            "linear1": 7 * w, "modulation.lin": 3 * w, "adaLN_modulation.1": 2 * w}  # fmt: skip
    for name in mods:
        if name.startswith("guidance_in"):
            continue
        out = next((v for k, v in rows.items() if name.endswith(k)), w)
        cols = 5 * w if name.endswith(("linear2", "img_mlp.2", "txt_mlp.2")) else 128 if name == "img_in" else w
        r = 2 if name == flux.SWAPPED else 1  # diffusers chunks its lora_A in two as well (below)
        sd[f"{name}.lora_A.weight"] = torch.randn(r, cols, generator=g)
        sd[f"{name}.lora_B.weight"] = torch.randn(out, r, generator=g)
    norms = [f"double_blocks.{i}.{n}.norm" for i in range(19) for n in ("img_attn", "txt_attn")]
    norms += [f"single_blocks.{i}.norm" for i in range(38)]
    sd.update({f"{n}.{q}_norm.scale": torch.randn(128, generator=g) for n in norms for q in ("query", "key")})
    path = tmp_path / "control.safetensors"
    save_file(sd, str(path))
    ours = load_adapter(path)
    theirs = _convert_bfl_flux_control_lora_to_diffusers(dict(sd))
    norms = {k: v for k, v in theirs.items() if "lora_" not in k}
    assert set(ours.replacements) == set(norms)
    assert all(torch.equal(ours.replacements[k], v) for k, v in norms.items())
    stems = {k.rsplit(".lora_A", 1)[0] for k in theirs if ".lora_A." in k}
    assert set(ours.modules) == stems
    for stem in stems - {"transformer.norm_out.linear"}:  # diffusers: alpha = rank (no alphas in the file)
        m = ours.modules[stem]  # the factors themselves (a full-width delta per module would take minutes)
        assert m.scale == 1.0 and torch.equal(m.down, theirs[f"{stem}.lora_A.weight"]), stem
        assert torch.equal(m.up, theirs[f"{stem}.lora_B.weight"]), stem
    # norm_out: diffusers swaps the halves of lora_B (shift, scale -> scale, shift: right) and of lora_A's rank rows
    # too (a permutation of A alone: wrong for rank > 1, formats.md); ours swaps B's rows only, as the weight's
    a, b = sd[f"{flux.SWAPPED}.lora_A.weight"], sd[f"{flux.SWAPPED}.lora_B.weight"]
    assert torch.allclose(ours.modules["transformer.norm_out.linear"].delta(), S._swap(b) @ a, atol=1e-5, rtol=0)
    assert torch.equal(theirs["transformer.norm_out.linear.lora_B.weight"], S._swap(b))


def _wide(model):
    """The tiny model with img_in taking twice the channels: diffusers' own widening (zero columns)."""
    from diffusers import FluxPipeline

    wide = copy.deepcopy(model)
    FluxPipeline._maybe_expand_transformer_param_shape_or_error_(
        wide, {"transformer.x_embedder.lora_A.weight": torch.zeros(1, 8),
               "transformer.x_embedder.lora_B.weight": torch.zeros(D, 1)})  # fmt: skip
    assert wide.x_embedder.weight.shape == (D, 8)
    return wide


def _diffusers_control(model, lora: dict) -> dict[str, torch.Tensor]:
    """What FluxControlPipeline.load_lora_weights + fuse_lora do, on the tiny model (diffusers' converter needs
    full width: its names are applied by the test's own table, checked against the converter above)."""
    from diffusers import FluxPipeline

    wide = _wide(model)
    state, norms = {}, {}
    for key, t in lora.items():
        stem, _, part = key.partition(".lora_")
        if not part:
            bfl = key.rsplit(".", 1)[0]
            norms[next(f"{d}.weight" for b, ds, _ in S._pairs({}) if b == bfl for d in ds)] = t
            continue
        diffs = next(ds for b, ds, _ in S._pairs({}) if b == stem)
        if part.startswith("A"):
            state.update({f"transformer.{d}.lora_A.weight": t for d in diffs})
            continue
        t = S._swap(t) if stem == "final_layer.adaLN_modulation.1" else t
        sizes = [D, D, D, t.shape[0] - 3 * D] if len(diffs) == 4 else [t.shape[0] // len(diffs)] * len(diffs)
        state.update({f"transformer.{d}.lora_B.weight": p for d, p in zip(diffs, torch.split(t, sizes), strict=True)})
    FluxPipeline.load_lora_into_transformer(state, network_alphas=None, transformer=wide, adapter_name="c")
    FluxPipeline._load_norm_into_transformer(norms, transformer=wide)
    return _fused(wide)


def test_control_merge_into_wide_pipeline_equals_diffusers(model, tmp_path):
    lora = control(model)
    path = tmp_path / "control.safetensors"
    save_file(lora, str(path))
    found = load_adapter(path)
    assert found.meta["dit"] == {"family": "flux", "layout": "bfl-control"} and len(found.replacements) == 6
    wide = S.save_pipeline(_wide(model), tmp_path / "wide")
    merge(wide, [path], tmp_path / "out")
    theirs = _diffusers_control(model, lora)
    ours = _weights(tmp_path / "out")
    _close(ours, theirs)
    assert torch.equal(ours["transformer_blocks.0.attn.norm_q.weight"], lora[NORMS[0]])
    assert float((ours["x_embedder.weight"] - _wide(model).x_embedder.weight).abs().max()) > 1e-2


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_control_merge_into_wide_single_file(model, tmp_path, prefix):
    lora = control(model)
    path = tmp_path / "control.safetensors"
    save_file(lora, str(path))
    base = tmp_path / "flux1-canny.safetensors"
    save_file(S.to_bfl(_wide(model).state_dict(), prefix), str(base))
    merge(base, [path], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert set(merged) == set(load_file(str(base)))
    _close(S.from_bfl(merged, prefix), _diffusers_control(model, lora))


def _cli(*args):
    from loratools.cli.main import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stderr


def test_control_into_plain_flux_is_refused_with_the_widths(model, pipeline, tmp_path):
    path = tmp_path / "control.safetensors"
    save_file(control(model), str(path))
    single = tmp_path / "flux1-dev.safetensors"
    save_file(S.to_bfl(model.state_dict()), str(single))
    for base in (pipeline, single):
        out = tmp_path / f"out-{base.name}"
        code, err = _cli("merge", base, path, "-o", out)
        errors = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
        assert code == 2 and len(errors) == 1, err
        assert "takes 8 inputs" in errors[0] and "takes 4" in errors[0] and path.name in errors[0]
        assert "Canny/Depth" in err and not out.exists()


def test_control_convert_is_refused_naming_the_norms(model, tmp_path):
    path = tmp_path / "control.safetensors"
    save_file(control(model), str(path))
    for fmt in ("kohya", "comfyui", "diffusers"):
        code, err = _cli("convert", path, "--to", fmt, "-o", tmp_path / f"o-{fmt}")
        assert code == 2 and "norm_q" in err and "Traceback" not in err, err


def test_info_names_xlabs_and_control(model, tmp_path):
    for name, tensors, layout in (("x", xlabs(), "XLabs"), ("c", control(model), "BFL control")):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        code, err = _cli("info", path)
        assert code == 0 and "not a LoRA adapter" not in err, err
        from loratools.ops.info import summarize

        assert summarize(load_adapter(path))["dit"]["family"] == "flux", layout


# -- broken files ------------------------------------------------------------------------------------------------------
Q1 = "double_blocks.0.processor.qkv_lora1"


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


#: (name, tensors from the valid xlabs()/control() files, words of the one line)
BROKEN = [
    ("xlabs-no-up", lambda m: {k: v for k, v in xlabs().items() if k != f"{Q1}.up.weight"}, (Q1, "up.weight")),
    ("xlabs-qkv-rows", lambda m: {**xlabs(), f"{Q1}.up.weight": torch.ones(3 * D - 1, 2)}, (Q1, "multiple of 3")),
    ("xlabs-rank", lambda m: {**xlabs(), f"{Q1}.up.weight": torch.ones(3 * D, 7)}, (Q1, "rank")),
    ("xlabs-nan", lambda m: {**xlabs(), f"{Q1}.down.weight": _nan(xlabs()[f"{Q1}.down.weight"])}, (Q1, "NaN")),
    ("xlabs-unknown", lambda m: {**xlabs(), "double_blocks.0.processor.mlp_lora.down.weight": torch.ones(2, D)},
     ("mlp_lora", "not an XLabs")),
    ("xlabs-3d", lambda m: {**xlabs(), f"{Q1}.down.weight": torch.ones(2, D, 1)}, (Q1, "2-D")),
    ("xlabs-int", lambda m: {**xlabs(), f"{Q1}.down.weight": torch.ones(2, D, dtype=torch.int32)}, (Q1, "float")),
    ("control-norm-2d", lambda m: {**control(m), NORMS[0]: torch.ones(8, 2)}, (NORMS[0], "1-D")),
    ("control-norm-nan", lambda m: {**control(m), NORMS[1]: _nan(torch.ones(8))}, (NORMS[1], "NaN")),
    ("control-norm-other", lambda m: {**control(m), "double_blocks.0.img_attn.norm.value_norm.scale": torch.ones(8)},
     ("value_norm", "norm")),
    ("control-qkv-rows",
     lambda m: {**control(m), "double_blocks.0.img_attn.qkv.lora_B.weight": torch.ones(3 * D + 1, 4)},
     ("img_attn.qkv", "rows")),
]  # fmt: skip


@pytest.mark.parametrize("command", ["info", "convert", "merge"])
@pytest.mark.parametrize(("name", "build", "expect"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_xlabs_and_control_files(model, pipeline, tmp_path, name, build, expect, command):
    path = tmp_path / f"{name}.safetensors"
    save_file(build(model), str(path))
    out = tmp_path / "out"
    args = {"info": ["info", path], "convert": ["convert", path, "--to", "diffusers", "-o", out],
            "merge": ["merge", pipeline, path, "-o", out]}[command]  # fmt: skip
    code, err = _cli(*args)
    errors = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
    assert code == 2 and len(errors) == 1, err
    assert "Traceback" not in err and path.name in errors[0], err
    for want in expect:
        assert want in errors[0], (want, errors[0])
    assert not out.exists()
