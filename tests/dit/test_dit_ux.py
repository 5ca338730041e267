"""A stranger's walk-through of the diffusion-transformer commands (issue 21, UX items 1 and 2): a zero ``.alpha`` is
said, not silently read as alpha = rank; ``convert --base`` of another family is refused naming both families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from dit_support import diffusers_flux, save_pipeline, transformer
from safetensors.torch import save_file

from loratools.cli.main import cli


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dit_ux")


@pytest.fixture(scope="module")
def flux(work: Path) -> tuple[Path, Path]:
    """A tiny Flux pipeline and a diffusers-keyed LoRA for it (``transformer.…lora_A/lora_B`` + ``.alpha`` keys) whose
    every other module stores ``.alpha`` = 0 (the rest 3)."""
    model = transformer()
    pipe = save_pipeline(model, work / "flux-pipe")
    tensors, _ = diffusers_flux(model)
    out = dict(tensors)
    for i, key in enumerate(sorted(k for k in tensors if k.endswith(".lora_A.weight"))):
        out[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(0.0 if i % 2 == 0 else 3.0)
    save_file(out, work / "flux-alpha0.safetensors")
    return pipe, work / "flux-alpha0.safetensors"


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Warning:")]


ZERO_TAIL = "(ComfyUI applies such modules at scale 0: no effect)"


def test_a_zero_alpha_is_said_once_and_info_shows_it(flux: tuple[Path, Path], tmp_path: Path) -> None:
    pipe, lora = flux
    line = f"Warning: {lora}: 15 of 30 modules store .alpha = 0, read as alpha = rank (scale 1), sd-scripts' rule "
    r = run("info", lora)
    assert r.exit_code == 0, r.output
    assert _warnings(r.stderr) == [line + ZERO_TAIL]  # one line, on stderr, naming the file and the count
    assert "note          alpha 0 read as alpha = rank: 15 of 30 modules store .alpha = 0" in r.stdout
    d = json.loads(run("info", lora, "--json").stdout)
    assert d["alpha_zero"] == {"modules": 15, "of": 30}
    zero = [m for m in d["modules"] if m["alpha"] == m["rank"]]  # the math is kohya's: alpha = rank, scale 1
    assert len(zero) == 15 and all(m["scale"] == 1 for m in zero)
    assert all(m["alpha"] == 3 for m in d["modules"] if m not in zero)
    r = run("merge", pipe, lora, "-o", tmp_path / "merged")
    assert r.exit_code == 0 and _warnings(r.stderr) == [line + ZERO_TAIL], r.output  # once, whatever reads it
    assert _warnings(run("info", lora, "-q").output) == []  # -q: nothing but errors


def test_stored_alphas_warn_nothing(work: Path) -> None:
    model = transformer()
    tensors, _ = diffusers_flux(model)
    out = dict(tensors)
    for key in (k for k in tensors if k.endswith(".lora_A.weight")):
        out[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
    save_file(out, work / "flux-alpha2.safetensors")
    r = run("info", work / "flux-alpha2.safetensors", "--json")
    assert r.exit_code == 0 and _warnings(r.output) == [] and json.loads(r.stdout)["alpha_zero"] is None


def test_a_zero_alpha_in_a_kohya_file_is_said_too(tmp_path: Path) -> None:
    """sd-scripts reads it as alpha = rank, ComfyUI as scale 0 (comfy/weight_adapter/lora.py): said, not chosen."""
    from safetensors.torch import load_file

    path = _sd_kohya(tmp_path / "k.safetensors")
    tensors = load_file(path)
    tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha"] = torch.tensor(0.0)
    save_file(tensors, tmp_path / "zero.safetensors")
    r = run("info", tmp_path / "zero.safetensors", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["alpha_zero"] == {"modules": 1, "of": 2}, r.output
    assert _warnings(r.stderr) == [f"Warning: {tmp_path / 'zero.safetensors'}: 1 of 2 modules store .alpha = 0, read "
                                   f"as alpha = rank (scale 1), sd-scripts' rule {ZERO_TAIL}"]  # fmt: skip
    scales = sorted(m["scale"] for m in json.loads(r.stdout)["modules"])
    assert scales == [0.5, 1.0]  # alpha 1 of rank 2; the zero one at rank 2 / rank 2
    r = run("info", path, "--json")
    assert _warnings(r.stderr) == [] and json.loads(r.stdout)["alpha_zero"] is None


def _sd_kohya(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A kohya SD 1.x UNet LoRA (two attention modules), with kohya's metadata or none."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"):  # fmt: skip
        tensors[f"{m}.lora_down.weight"] = torch.randn(2, 32, generator=g)
        tensors[f"{m}.lora_up.weight"] = torch.randn(32, 2, generator=g)
        tensors[f"{m}.alpha"] = torch.tensor(1.0)
    save_file(tensors, path, metadata=metadata)
    return path


def _refused(r, out: Path) -> str:
    assert r.exit_code == 2, r.output
    assert not out.exists()
    lines = [line for line in r.stderr.splitlines() if not line.startswith("Warning:")]
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: "), r.stderr
    return "\n".join(lines) + "\n"


def test_convert_refuses_a_base_of_another_family(flux: tuple[Path, Path], work: Path, tmp_path: Path) -> None:
    """convert --base checked as merge checks it: one line naming the family the file looks like and the base's
    (an SD file said "18 module(s) still have kohya names ... pass --base" with --base given)."""
    pipe, flux_lora = flux
    from wan_qwen_support import WAN

    wan = WAN.save_pipeline(WAN.model(), work / "wan-pipe")
    err = _refused(run("convert", flux_lora, "--to", "kohya", "--base", wan, "-o", tmp_path / "a.safetensors"),
                   tmp_path / "a.safetensors")  # fmt: skip  (the DiT reader's own refusal)
    assert "a Flux LoRA in the diffusers layout" in err and "WanTransformer3DModel" in err
    bare = _sd_kohya(tmp_path / "sd.safetensors")
    for base in (pipe, wan):
        err = _refused(run("convert", bare, "--to", "peft", "--base", base, "-o", tmp_path / "b"), tmp_path / "b")
        cls = "FluxTransformer2DModel" if base == pipe else "WanTransformer3DModel"
        assert err.startswith(
            f"Error: {bare}: this is a Stable Diffusion (UNet) LoRA, and none of its 2 modules is in the base: "
            f"--base {base} is a {cls} pipeline\n"
        ), err
    tagged = _sd_kohya(tmp_path / "sd-tagged.safetensors", {"ss_base_model_version": "sd_v1"})
    err = _refused(run("convert", tagged, "--to", "peft", "--base", pipe, "-o", tmp_path / "c"), tmp_path / "c")
    assert "this is a Stable Diffusion 1/2 LoRA" in err and "(sd vs flux)" in err and "FluxTransformer2DModel" in err
    r = run("convert", work / "flux-alpha0.safetensors", "--to", "peft", "--base", pipe, "-o", tmp_path / "ok")
    assert r.exit_code == 0, r.output  # its own family converts as before


def test_convert_says_to_pass_the_pipeline_for_a_component_folder(flux: tuple[Path, Path], tmp_path: Path) -> None:
    """--to diffusers names modules by component: --base PIPE/transformer gets a hint naming PIPE (it said "30
    module(s) are not under a pipeline component ... kohya names need --base PIPELINE")."""
    pipe, _ = flux
    from dit_support import kohya_flux

    kohya = tmp_path / "flux-kohya.safetensors"
    save_file(kohya_flux(transformer()), kohya)
    out = tmp_path / "d"
    err = _refused(run("convert", kohya, "--to", "diffusers", "--base", pipe / "transformer", "-o", out), out)
    assert f"--base {pipe / 'transformer'} is one model's folder, not a diffusers pipeline" in err
    assert f"Hint: pass the pipeline folder: --base {pipe}\n" in err
    assert run("convert", kohya, "--to", "diffusers", "--base", pipe, "-o", out).exit_code == 0
