"""Hostile ComfyUI fp8-scaled single files (issue 21 item 3): the tiny Flux fixture (fixtures/dit/flux,
``model.diffusion_model.`` names) with its blocks' Linear weights in float8_e4m3fn + ``scale_weight`` and the
``scaled_fp8`` marker, broken in one place each; merged with the fixture's kohya LoRA.

Header cases are found when the file is opened (every command, ``info --base`` too); value cases when a module
is dequantized (``merge``, ``--requantize``; ``validate --base`` reports them as a finding, exit 1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from hostile import HostileCase
from reliability_support import FIXTURES

FLUX = FIXTURES / "dit" / "flux"
LORA = FLUX / "kohya-lora.safetensors"
P = "model.diffusion_model."
QKV = f"{P}double_blocks.0.img_attn.qkv"  # touched by the LoRA
MERGE = ["merge", "B", LORA, "-o", "O"]
DATA_COMMANDS = {"merge": MERGE, "merge-requantize": [*MERGE, "--requantize"], "validate": ["validate", LORA, "--base", "B"]}  # noqa: E501
#: ``info LORA --base FILE`` is left out: it takes any DiT single file for a kohya adapter today (not this area's)
HEADER_COMMANDS = dict(DATA_COMMANDS)
Tensors = dict[str, torch.Tensor]


def scaled() -> Tensors:
    """The fixture as ComfyUI's fp8-scaled files hold it (scale = amax / 448, as ComfyUI's quantizer)."""
    from safetensors.torch import load_file

    out: Tensors = {}
    for k, v in load_file(str(FLUX / "flux1-tiny.safetensors")).items():
        if k.endswith(".weight") and v.ndim == 2 and "blocks." in k:
            w = v.float()
            s = w.abs().amax() / 448.0
            out[k] = (w * (1.0 / s)).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[k.removesuffix(".weight") + ".scale_weight"] = s
        else:
            out[k] = v
    out[f"{P}scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


CASES: list[HostileCase] = []


def case(name: str, expect: list[str], *, data: bool = False, weights: bool = False) -> Callable:
    def register(edit: Callable[[Tensors], None]) -> Callable:
        def build(folder: Path) -> Path:
            from safetensors.torch import save_file

            t = scaled()
            edit(t)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"flux-fp8-scaled-{name}.safetensors"
            save_file({k: v.contiguous() for k, v in t.items()}, str(path))
            return path

        commands = dict(DATA_COMMANDS if data else HEADER_COMMANDS)
        if weights:  # validate reads the scales, not the packed weights (docs/quantized.md)
            del commands["validate"]
        CASES.append(HostileCase(f"comfy-fp8-{name}", build, expect, commands, validate_exit=1 if data else 2))
        return edit

    return register


def _scale(value: float) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[f"{QKV}.scale_weight"] = torch.tensor(value)

    return edit


case("scale-nan", [f"{QKV}.scale_weight", "NaN"], data=True)(_scale(float("nan")))
case("scale-inf", [f"{QKV}.scale_weight", "NaN/Inf"], data=True)(_scale(float("inf")))
case("scale-zero", [f"{QKV}.scale_weight", "positive"], data=True)(_scale(0.0))
case("scale-negative", [f"{QKV}.scale_weight", "positive"], data=True)(_scale(-0.01))
case("scale-huge", [f"{QKV}.scale_weight", "beyond"], data=True)(_scale(1e38))


@case("scale-two-values", [f"{QKV}.scale_weight", "2 values"])
def _two(t: Tensors) -> None:
    t[f"{QKV}.scale_weight"] = torch.tensor([0.01, 0.02])


@case("scale-int", [f"{QKV}.scale_weight", "I32"])
def _int_scale(t: Tensors) -> None:
    t[f"{QKV}.scale_weight"] = torch.tensor(1, dtype=torch.int32)


@case("weight-without-scale", [f"{QKV}.weight", "no", "scale_weight"])
def _no_scale(t: Tensors) -> None:
    del t[f"{QKV}.scale_weight"]


@case("no-marker", ["scale_weight", "scaled_fp8 marker"])
def _no_marker(t: Tensors) -> None:
    del t[f"{P}scaled_fp8"]


@case("marker-int", [f"{P}scaled_fp8", "I8"])
def _marker_int(t: Tensors) -> None:
    t[f"{P}scaled_fp8"] = torch.empty(0, dtype=torch.int8)


@case("weight-e5m2-marker-e4m3", [f"{QKV}.weight", "F8_E5M2"])
def _e5m2(t: Tensors) -> None:
    t[f"{QKV}.weight"] = t[f"{QKV}.weight"].float().to(torch.float8_e5m2)


@case("weight-3d", [f"{QKV}.weight", "2-D"])
def _three_d(t: Tensors) -> None:
    t[f"{QKV}.weight"] = t[f"{QKV}.weight"].reshape(1, *t[f"{QKV}.weight"].shape)


@case("weight-nan-code", [f"{QKV}.weight", "NaN"], data=True, weights=True)
def _nan_code(t: Tensors) -> None:
    w = t[f"{QKV}.weight"].clone()
    w.view(torch.uint8)[0, 0] = 0x7F  # float8_e4m3fn's NaN
    t[f"{QKV}.weight"] = w


__all__ = ["CASES", "scaled"]
