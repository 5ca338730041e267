"""``merge --expand-base``: a Flux control LoRA (img_in/x_embedder taking the latent and the control latent, twice
the base's inputs) merged into a plain Flux base whose input layer is widened with zero columns first — against
diffusers itself: ``FluxControlPipeline.load_lora_weights`` (which widens the transformer in memory,
``_maybe_expand_transformer_param_shape_or_error_``) + ``fuse_lora`` for the weights, the LoRA-active forward for the
outputs; our widened folder loads back with ``from_pretrained`` (diffusers' own save of a widened model does not)
(issue 21)."""

from __future__ import annotations

import copy
import json

import dit_support as S
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_xlabs_control import _cli, _close, _diffusers_control, _fused, _nan, _weights, _wide, control

from loratools import merge

D = S.D
WIDE = 2 * S.CONFIG["in_channels"]  # the tiny model's img_in takes 4 inputs; a control LoRA's 8


def diffusers_control(model, seed: int = 7) -> dict[str, torch.Tensor]:
    """A diffusers-trained control LoRA (``train_control_lora_flux.py`` names): x_embedder's lora_A takes WIDE inputs,
    LoRAs on attention, MLP and the output layers; no alphas (alpha = rank for diffusers and for us)."""
    g = torch.Generator().manual_seed(seed)
    names = ["x_embedder", "context_embedder", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.attn.to_k",
             "single_transformer_blocks.0.proj_out", "proj_out"]  # fmt: skip
    out = {}
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        r, n = 2 + i % 3, WIDE if name == "x_embedder" else lin.in_features
        out[f"transformer.{name}.lora_A.weight"] = torch.randn(r, n, generator=g) * 0.3
        out[f"transformer.{name}.lora_B.weight"] = torch.randn(lin.out_features, r, generator=g) * 0.3
    return out


def control_pipe(transformer):
    """A FluxControlPipeline holding only the transformer (what load_lora_weights needs)."""
    from diffusers import FluxControlPipeline

    none = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    return FluxControlPipeline(transformer=transformer, **none)


def wide_inputs(seed: int = 2) -> dict:
    """The tiny model's inputs with a control latent beside the latent (WIDE channels)."""
    x = S.inputs()
    g = torch.Generator().manual_seed(seed)
    x["hidden_states"] = torch.cat([x["hidden_states"], torch.randn(x["hidden_states"].shape, generator=g)], dim=-1)
    return x


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**wide_inputs(), return_dict=False)[0]


def _folder_model(folder):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(str(folder)).eval()


# -- the oracle: diffusers' own loader ---------------------------------------------------------------------------------
def test_diffusers_control_lora_into_plain_pipeline_equals_diffusers(model, pipeline, tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(diffusers_control(model), str(path))
    pipe = control_pipe(copy.deepcopy(model))
    pipe.load_lora_weights(str(path), adapter_name="c")  # widens x_embedder to WIDE inputs, then loads the LoRA
    theirs = pipe.transformer
    assert theirs.x_embedder.base_layer.weight.shape == (D, WIDE)
    active = run(theirs)
    plain = run(_wide(model))
    assert float((active - plain).abs().max()) > 100 * 1e-4  # the parity check: the LoRA moves the output
    summary = merge(pipeline, [path], tmp_path / "out", expand_base=True)
    assert any("widened transformer.x_embedder.weight from 4 to 8" in n for n in summary.notes), summary.notes
    ours = _weights(tmp_path / "out")
    _close(ours, _fused(theirs))
    assert ours["x_embedder.weight"].shape == (D, WIDE)
    loaded = _folder_model(tmp_path / "out" / "transformer")  # diffusers loads our widened folder as it is
    assert loaded.config.in_channels == WIDE and loaded.config.out_channels == 4
    assert float((run(loaded) - active).abs().max()) <= 1e-4


def test_bfl_control_lora_into_plain_pipeline(model, pipeline, tmp_path):
    """The BFL file (norm scales replaced too) into the plain pipeline equals diffusers' widening + LoRA + norms +
    fuse_lora, and equals the merge into an already widened base; the pipeline is the control pipeline now."""
    from diffusers import DiffusionPipeline, FluxControlPipeline

    lora = control(model)
    path = tmp_path / "control.safetensors"
    save_file(lora, str(path))
    merge(pipeline, [path], tmp_path / "out", expand_base=True)
    theirs = _diffusers_control(model, lora)
    ours = _weights(tmp_path / "out")
    _close(ours, theirs)
    merge(S.save_pipeline(_wide(model), tmp_path / "wide"), [path], tmp_path / "want")
    assert all(torch.equal(v, _weights(tmp_path / "want")[k]) for k, v in ours.items())
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"]) == (WIDE, 4)
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxControlPipeline"
    none = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    for cls in (FluxControlPipeline, DiffusionPipeline):
        pipe = cls.from_pretrained(str(tmp_path / "out"), **none)
        assert type(pipe).__name__ == "FluxControlPipeline"
    wide = _wide(model)
    wide.load_state_dict(theirs)
    assert float((run(pipe.transformer) - run(wide)).abs().max()) <= 1e-4
    assert float((run(wide) - run(_wide(model))).abs().max()) > 100 * 1e-4


def _tiny_vae():
    """A VAE whose latent (1 channel, packed 2x2: the tiny transformer's 4 inputs) fits the tiny model."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 4), layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5,
    ).eval()  # fmt: skip


def _generate(pipe) -> torch.Tensor:
    """FluxControlPipeline end to end (control image through the VAE, two steps), latents out."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    image = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))
    with torch.no_grad():
        return pipe(
            prompt_embeds=torch.randn(1, 3, 12, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
            control_image=image, height=16, width=16, num_inference_steps=2, guidance_scale=3.5,
            output_type="latent", generator=torch.Generator().manual_seed(0), max_sequence_length=3,
        ).images  # fmt: skip


def test_widened_pipeline_generates_as_diffusers_control_pipeline(model, pipeline, tmp_path):
    """Our merged pipeline folder, opened with FluxControlPipeline.from_pretrained, generates what diffusers'
    FluxControlPipeline generates with the control LoRA loaded on the plain transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlPipeline

    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(diffusers_control(model), str(path))
    merge(pipeline, [path], tmp_path / "out", expand_base=True)
    parts = dict(vae=_tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None)  # fmt: skip
    ours = _generate(FluxControlPipeline.from_pretrained(str(tmp_path / "out"), **parts))
    theirs_pipe = FluxControlPipeline(transformer=copy.deepcopy(model), **parts)
    theirs_pipe.load_lora_weights(str(path), adapter_name="c")
    theirs = _generate(theirs_pipe)
    plain = _generate(FluxControlPipeline(transformer=_wide(model), **parts))
    assert float((theirs - plain).abs().max()) > 100 * 1e-4
    assert float((ours - theirs).abs().max()) <= 1e-4


def test_diffusers_own_widened_save_does_not_load_back(model, tmp_path):
    """Why the config is ours to write: diffusers widens x_embedder in memory but its save keeps in_channels."""
    wide = _wide(model)
    assert wide.config.in_channels == WIDE  # in memory
    wide.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "theirs" / "config.json").read_text())["in_channels"] == 4
    with pytest.raises(Exception, match="x_embedder"):
        _folder_model(tmp_path / "theirs")


def test_into_bare_transformer_folder(model, tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(diffusers_control(model), str(path))
    model.save_pretrained(tmp_path / "transformer")
    merge(tmp_path / "transformer", [path], tmp_path / "out", expand_base=True)
    pipe = control_pipe(copy.deepcopy(model))
    pipe.load_lora_weights(str(path), adapter_name="c")
    loaded = _folder_model(tmp_path / "out")
    assert float((run(loaded) - run(pipe.transformer)).abs().max()) <= 1e-4


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_into_plain_single_file(model, tmp_path, prefix):
    """A BFL/ComfyUI single file: just the wider img_in (ComfyUI reads in_channels from its shape)."""
    lora = control(model)
    path = tmp_path / "control.safetensors"
    save_file(lora, str(path))
    base = tmp_path / "flux1-dev.safetensors"
    save_file(S.to_bfl(model.state_dict(), prefix), str(base))
    code, out = _cli("merge", base, path, "-o", tmp_path / "merged.safetensors", "--expand-base")
    assert code == 0
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert set(merged) == set(load_file(str(base)))
    assert merged[f"{prefix}img_in.weight"].shape == (D, WIDE)
    _close(S.from_bfl(merged, prefix), _diffusers_control(model, lora))


# -- the flag's lines --------------------------------------------------------------------------------------------------
def _errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("Error: ")]


def test_without_the_flag_the_one_line_names_it(model, pipeline, tmp_path):
    for name, tensors in (("control", control(model)), ("pytorch_lora_weights", diffusers_control(model))):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        code, err = _cli("merge", pipeline, path, "-o", tmp_path / f"o-{name}")
        assert code == 2 and len(_errors(err)) == 1, err
        assert "--expand-base" in _errors(err)[0] and "Traceback" not in err, err
        assert not (tmp_path / f"o-{name}").exists()
        from click.testing import CliRunner

        from loratools.cli.main import cli

        r = CliRunner().invoke(cli, ["validate", str(path), "--base", str(pipeline)])  # its shape error's hint
        assert r.exit_code == 1 and "control LoRA (Canny/Depth)" in r.output and "--expand-base" in r.output, r.output
        assert "trained on a different base model" not in r.output, r.output


def test_flag_on_a_base_that_needs_none_is_a_noted_noop(model, pipeline, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(S.kohya_flux(model), str(path))
    merge(pipeline, [path], tmp_path / "plain")
    summary = merge(pipeline, [path], tmp_path / "out", expand_base=True)
    assert summary.notes == [n for n in summary.notes if "no input layer needed widening" in n] and summary.notes
    for rel in ("transformer/diffusion_pytorch_model.safetensors", "transformer/config.json", "model_index.json"):
        assert (tmp_path / "out" / rel).read_bytes() == (tmp_path / "plain" / rel).read_bytes(), rel


def test_flag_refused_by_a_base_kind_that_cannot_widen(model, tmp_path):
    from loratools.errors import UsageError

    gguf = tmp_path / "flux1-dev-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")  # the target is picked by the name before the file is read
    path = tmp_path / "control.safetensors"
    save_file(control(model), str(path))
    with pytest.raises(UsageError, match="--expand-base: merging into a GGUF"):
        merge(gguf, [path], tmp_path / "out.gguf", expand_base=True)


#: (name, the control LoRA as it is broken, words of the one line); merged into the plain pipeline with the flag
def _img_in(m, width: int) -> dict[str, torch.Tensor]:
    lora = control(m)
    return {**lora, "img_in.lora_A.weight": torch.ones(lora["img_in.lora_B.weight"].shape[1], width)}


BROKEN = [
    ("narrower", lambda m: _img_in(m, 2), ("img_in", "fewer than")),
    ("not-a-multiple", lambda m: _img_in(m, 6), ("img_in", "not a multiple")),
    ("nan", lambda m: {**control(m), "img_in.lora_A.weight": _nan(control(m)["img_in.lora_A.weight"])},
     ("img_in", "NaN")),
    ("diffusers-not-a-multiple", lambda m: {**diffusers_control(m),
                                            "transformer.x_embedder.lora_A.weight": torch.ones(2, 6)},
     ("x_embedder", "not a multiple")),
    ("diffusers-nan", lambda m: {**diffusers_control(m), "transformer.x_embedder.lora_B.weight": _nan(
        diffusers_control(m)["transformer.x_embedder.lora_B.weight"])}, ("x_embedder", "NaN")),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "expect"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_control_files_with_the_flag(model, pipeline, tmp_path, name, build, expect):
    path = tmp_path / f"{name}.safetensors"
    save_file(build(model), str(path))
    out = tmp_path / "out"
    code, err = _cli("merge", pipeline, path, "-o", out, "--expand-base")
    errors = _errors(err)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert path.name in errors[0], errors[0]
    for want in expect:
        assert want in errors[0], (want, errors[0])
    assert not out.exists()


def test_standalone_verify_of_a_widened_merge(model, pipeline, tmp_path):
    """``verify --expand-base`` checks a widened output against the plain base tensor by tensor; without the flag
    it is the one refusal line naming the flag; the widened layer changed afterwards fails it."""
    from click.testing import CliRunner

    from loratools.cli.main import cli

    path = tmp_path / "control.safetensors"
    save_file(control(model), str(path))
    merge(pipeline, [path], tmp_path / "out", expand_base=True)
    args = ["verify", tmp_path / "out", "--base", pipeline, "--adapter", path]
    r = CliRunner().invoke(cli, [str(a) for a in [*args, "--expand-base"]], catch_exceptions=False)
    assert r.exit_code == 0 and r.stdout.startswith("verified: "), r.output
    code, err = _cli(*args)
    assert code == 2 and "--expand-base" in err, err
    weights = next((tmp_path / "out" / "transformer").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["x_embedder.weight"] = tensors["x_embedder.weight"] * 1.5  # the widened layer, changed afterwards
    save_file(tensors, str(weights))
    r = CliRunner().invoke(cli, [str(a) for a in [*args, "--expand-base"]], catch_exceptions=False)
    assert r.exit_code == 1 and r.stdout.startswith("FAILED") and "x_embedder.weight" in r.stdout, r.output
