"""Broken and unhandled diffusion-transformer LoRAs: each one is refused by info, convert and merge with exit 2 and
one ``Error:`` line naming the file and the tensor (or the layout), nothing written (issue 21 item 4).

The variants are generated from one valid kohya Flux file of the tiny model (dit_support), built at test time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dit_support as S
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]
QKV = "lora_unet_double_blocks_0_img_attn_qkv"
L1 = "lora_unet_single_blocks_0_linear1"


def _drop(suffix: str) -> Callable[[Tensors], Tensors]:
    return lambda sd: {k: v for k, v in sd.items() if not k.endswith(suffix)}


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Tensors], Tensors]:
    return lambda sd: {**sd, key: value(sd[key])}


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = float("nan")
    return t


#: (name, how the valid file is broken, what the one error line must say)
BROKEN: list[tuple[str, Callable[[Tensors], Tensors], tuple[str, ...]]] = [
    ("no-up", _drop(f"{QKV}.lora_up.weight"), ("double_blocks.0.img_attn.qkv", "lora_up")),
    ("no-down", _drop(f"{L1}.lora_down.weight"), ("single_blocks.0.linear1", "lora_down")),
    ("rank-mismatch", _set(f"{QKV}.lora_up.weight", lambda t: t[:, :-1].contiguous()), ("img_attn.qkv", "rank")),
    ("qkv-rows", _set(f"{QKV}.lora_up.weight", lambda t: t[:-1].contiguous()), ("img_attn.qkv", "rows")),
    ("linear1-rows", _set(f"{L1}.lora_up.weight", lambda t: t[: 2 * S.D].contiguous()), ("linear1", "rows")),
    ("swap-odd", _set("lora_unet_final_layer_adaLN_modulation_1.lora_up.weight", lambda t: t[:-1].contiguous()),
     ("adaLN_modulation.1", "even")),
    ("alpha-vector", _set(f"{QKV}.alpha", lambda t: torch.ones(3)), ("img_attn.qkv.alpha", "scalar")),
    ("alpha-nan", _set(f"{QKV}.alpha", lambda t: torch.tensor(float("nan"))), ("img_attn_qkv.alpha", "NaN")),
    ("nan-factor", _set(f"{L1}.lora_up.weight", _nan), ("linear1", "NaN")),
    ("inf-factor", _set(f"{QKV}.lora_down.weight", lambda t: t.clone().fill_(float("inf"))), ("qkv", "NaN/Inf")),
    ("three-d", _set(f"{QKV}.lora_down.weight", lambda t: t.unsqueeze(-1).contiguous()), ("img_attn.qkv", "2-D")),
    ("unknown-module", lambda sd: {**sd, "lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight": torch.ones(2, 2)},
     ("img_attn_qkvx", "names no Flux module")),
    ("unknown-part", lambda sd: {**sd, f"{QKV}.lora_mid.weight": torch.ones(2, 2)}, ("lora_mid", "not a Flux LoRA")),
    ("dora", lambda sd: {**sd, f"{QKV}.dora_scale": torch.ones(3 * S.D, 1)}, ("dora_scale", "DoRA")),
    ("loha", lambda sd: {**sd, f"{QKV}.hada_w1_a": torch.ones(3 * S.D, 2)}, ("hada_w1_a", "LyCORIS")),
    ("int-factor", _set(f"{QKV}.lora_down.weight", lambda t: t.to(torch.int32)), ("qkv", "float")),
]  # fmt: skip

#: layouts recognized but not read yet: (name, tensors, words of the one line)
UNHANDLED: list[tuple[str, Tensors, tuple[str, ...]]] = [
    ("wan-vace", {"diffusion_model.vace_blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 4)},
     ("vace_blocks", "no module loratools knows")),
    ("flux-bare-diffusers", {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4),
                             "single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4)},
     ("a Flux LoRA", "bare")),
]  # fmt: skip


def invoke(*args: object) -> tuple[int, str, str]:
    from loratools.cli.main import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def _refused(path: Path, args: list, out: Path, expect: tuple[str, ...]) -> None:
    code, stdout, stderr = invoke(*args)
    text = stdout + stderr
    assert "Traceback" not in text and "internal error" not in text.lower(), text
    assert code == 2, text
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1, stderr
    assert path.name in errors[0], errors[0]
    for want in expect:
        assert want in errors[0], (want, errors[0])
    assert not out.exists()


def _commands(path: Path, out: Path, pipeline: Path) -> dict[str, list]:
    return {
        "info": ["info", path],
        "convert": ["convert", path, "--to", "diffusers", "-o", out],
        "merge": ["merge", pipeline, path, "-o", out],
    }


@pytest.mark.parametrize("command", ["info", "convert", "merge"])
@pytest.mark.parametrize(("name", "damage", "expect"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_flux_file(model, pipeline, tmp_path, name, damage, expect, command):
    path = tmp_path / f"{name}.safetensors"
    save_file(damage(S.kohya_flux(model)), str(path))
    out = tmp_path / "out"
    _refused(path, _commands(path, out, pipeline)[command], out, expect)


@pytest.mark.parametrize("command", ["info", "convert", "merge"])
@pytest.mark.parametrize(("name", "tensors", "expect"), UNHANDLED, ids=[u[0] for u in UNHANDLED])
def test_unhandled_layout_is_named(pipeline, tmp_path, name, tensors, expect, command):
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    out = tmp_path / "out"
    _refused(path, _commands(path, out, pipeline)[command], out, expect)


def test_flux_lora_into_a_base_it_binds_nowhere(model, tmp_path):
    """A Flux file given an SD pipeline (a unet) or an unrelated single file: one line naming both families."""
    path = tmp_path / "flux.safetensors"
    save_file(S.kohya_flux(model), str(path))
    sd_pipe = tmp_path / "sd"
    (sd_pipe / "unet").mkdir(parents=True)
    save_file({"conv_in.weight": torch.ones(4, 4, 3, 3)}, str(sd_pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    (sd_pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "x"]}')
    other = tmp_path / "llama.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4)}, str(other))
    for base, words in ((sd_pipe, ("a Flux LoRA", "without a transformer", "unet")),
                        (other, ("a Flux LoRA", "none of its modules is in the base"))):  # fmt: skip
        out = tmp_path / f"out-{base.name}"
        _refused(path, ["merge", base, path, "-o", out], out, words)
