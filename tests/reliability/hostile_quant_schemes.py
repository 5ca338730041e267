"""Hostile quantized bases of the scheme modules (issues 20 §3, 22 §2): compressed-tensors int and NVFP4, MLX affine
and MXFP4, each broken in one place, plus :func:`fuzz_base` (the seeded fuzzer, driven by
tests/quant/test_quant_fuzz.py).

Sources are the tiny ``bases/llama`` packed here by loratools' own quantizers (bit-equal to the libraries' in
tests/quant). MXFP4 needs 3-D experts, which Llama has not: its source adds one gpt-oss-shaped expert tensor,
and its cases are header cases (found when the base is opened, before the adapter is matched).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from hostile import HostileCase
from hostile_quant import (
    DATA_COMMANDS,
    HEADER_COMMANDS,
    JSON_VALUES,
    REQUANTIZE,
    Tensors,
    _cast,
    _linear,
    _llama16,
    _reshaped,
    _save,
)

Q = "model.layers.0.self_attn.q_proj"  # touched by the llama adapter
K = "model.layers.0.self_attn.k_proj"  # untouched
E = "model.layers.0.mlp.experts.gate_up_proj"


def ct_int() -> tuple[Tensors, dict]:
    """compressed-tensors pack-quantized int4, groups of 16, asymmetric (packed zero points)."""
    from loratools.checkpoint.quant.compressed import quantize_int

    t, cfg = _llama16()
    for k in [k for k in t if _linear(k)]:
        m = k.removesuffix(".weight")
        new = quantize_int(t.pop(k).float(), {"bits": 4, "strategy": "group", "group_size": 16}, True)
        t.update({f"{m}.weight_packed": new["weight"], f"{m}.weight_scale": new["scale"],
                  f"{m}.weight_zero_point": new["zero_point"]})  # fmt: skip
        t[f"{m}.weight_shape"] = torch.tensor([new["scale"].shape[0], new["scale"].shape[1] * 16])
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": groups,
    }
    return t, cfg


def nvfp4() -> tuple[Tensors, dict]:
    from loratools.checkpoint.quant.compressed import quantize_nvfp4

    t, cfg = _llama16()
    for k in [k for k in t if _linear(k)]:
        m = k.removesuffix(".weight")
        new = quantize_nvfp4(t.pop(k).to(torch.bfloat16))
        t.update({f"{m}.weight_packed": new["weight"], f"{m}.weight_scale": new["scale"],
                  f"{m}.weight_global_scale": new["global_scale"]})  # fmt: skip
    weights = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                                  "config_groups": groups}  # fmt: skip
    return t, cfg


def mlx4() -> tuple[Tensors, dict]:
    """MLX affine 4-bit, groups of 32 (down_proj's 48 inputs are not whole groups: left in float, as mlx-lm does)."""
    from loratools.checkpoint.quant.mlx import quantize_affine

    t, cfg = _llama16()
    for k in [k for k in t if _linear(k) and t[k].shape[-1] % 32 == 0]:
        m = k.removesuffix(".weight")
        t[k], t[f"{m}.scales"], t[f"{m}.biases"] = quantize_affine(t[k].float(), 4, 32)
    cfg["quantization"] = {"group_size": 32, "bits": 4}
    cfg["quantization_config"] = dict(cfg["quantization"])
    return t, cfg


def mxfp4() -> tuple[Tensors, dict]:
    from loratools.checkpoint.quant.mxfp4 import quantize_blocks

    t, cfg = _llama16()
    t[f"{E}_blocks"], t[f"{E}_scales"] = quantize_blocks(
        torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(0))
    )
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    return t, cfg


SOURCES: dict[str, Callable[[], tuple[Tensors, dict]]] = {"ct-int": ct_int, "nvfp4": nvfp4, "mlx4": mlx4,
                                                          "mxfp4": mxfp4}  # fmt: skip
REQUANTIZABLE = ("ct-int", "nvfp4", "mlx4")
CASES: list[HostileCase] = []


def case(name: str, source: str, expect: list[str], *, data: bool = False) -> Callable:
    def register(edit: Callable[[Tensors, dict], None]) -> Callable:
        def build(folder: Path) -> Path:
            t, cfg = SOURCES[source]()
            edit(t, cfg)
            return _save(folder / f"base-{name}", t, cfg)

        commands = dict(DATA_COMMANDS if data else HEADER_COMMANDS)
        if source in REQUANTIZABLE:
            commands.update(REQUANTIZE)
        CASES.append(HostileCase(f"quant-{name}", build, expect, commands, validate_exit=1 if data else 2))
        return edit

    return register


def _put(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Tensors, dict], None]:
    def edit(t: Tensors, _: dict) -> None:
        t[key] = value(t[key])

    return edit


def _nan_at(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[-1] = math.nan
    return x


def _register() -> None:
    # values: found when a state is read (merge, validate --base)
    case("ct-nan-scale", "ct-int", [f"{Q}.weight_scale", "NaN"], data=True)(_put(f"{Q}.weight_scale", _nan_at))
    case("ct-inf-scale-untouched", "ct-int", [f"{K}.weight_scale"], data=True)(
        _put(f"{K}.weight_scale", lambda x: torch.full_like(x, math.inf)))  # fmt: skip
    case("nvfp4-zero-global", "nvfp4", [f"{Q}.weight_global_scale"], data=True)(
        _put(f"{Q}.weight_global_scale", torch.zeros_like))  # fmt: skip
    case("nvfp4-nan-scale", "nvfp4", [f"{K}.weight_scale", "NaN"], data=True)(
        _put(f"{K}.weight_scale", lambda x: _nan_at(x.float()).to(torch.float8_e4m3fn)))  # fmt: skip
    case("ct-negative-scale", "ct-int", [f"{Q}.weight_scale", "negative"], data=True)(
        _put(f"{Q}.weight_scale", lambda x: -x))  # fmt: skip
    case("nvfp4-negative-scale", "nvfp4", [f"{Q}.weight_scale", "negative"], data=True)(
        _put(f"{Q}.weight_scale", lambda x: (-x.float()).to(torch.float8_e4m3fn)))  # fmt: skip
    case("mlx-nan-biases", "mlx4", [f"{Q}.biases", "NaN"], data=True)(_put(f"{Q}.biases", _nan_at))
    case("mlx-huge-scales", "mlx4", [f"{K}.scales", "range"], data=True)(
        _put(f"{K}.scales", lambda x: torch.full_like(x, 1e38)))  # fmt: skip
    # headers: found when the base is opened (every command, info too)
    case("ct-scale-shape", "ct-int", [f"{Q}.weight_scale", "shape"])(_put(f"{Q}.weight_scale", lambda x: x[:, :1]))
    case("ct-zero-point-dtype", "ct-int", [f"{K}.weight_zero_point", "I32"])(
        _put(f"{K}.weight_zero_point", lambda x: x.float()))  # fmt: skip
    case("ct-packed-dtype", "ct-int", [f"{Q}.weight_packed", "I32"])(
        _put(f"{Q}.weight_packed", lambda x: x.to(torch.int64))
    )

    @case("ct-no-groups", "ct-int", ["config_groups"])
    def _(t: Tensors, cfg: dict) -> None:
        cfg["quantization_config"]["config_groups"] = {}

    @case("ct-bits-bool", "ct-int", ["num_bits"])
    def _(t: Tensors, cfg: dict) -> None:
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = True

    @case("ct-symmetric-str", "ct-int", ["symmetric"])
    def _(t: Tensors, cfg: dict) -> None:
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = "no"

    case("ct-asym-no-zero-point", "ct-int", [f"{Q}.weight_packed", "weight_zero_point"])(
        lambda t, _: t.pop(f"{Q}.weight_zero_point"))  # fmt: skip
    case("ct-stated-shape", "ct-int", [f"{Q}.weight_shape", "packed"], data=True)(
        _put(f"{Q}.weight_shape", lambda x: x * 2))  # fmt: skip
    case("nvfp4-scale-grid", "nvfp4", [f"{Q}.weight_scale", "shape"])(_put(f"{Q}.weight_scale", lambda x: x[:, 1:]))
    case("nvfp4-no-global", "nvfp4", [f"{K}.weight_packed", "weight_global_scale"])(
        lambda t, _: t.pop(f"{K}.weight_global_scale"))  # fmt: skip
    case("mlx-biases-missing", "mlx4", [f"{Q}.biases"])(lambda t, _: t.pop(f"{Q}.biases"))
    case("mlx-weight-dtype", "mlx4", [f"{K}.weight", "U32"])(_put(f"{K}.weight", lambda x: x.view(torch.int32)))
    case("mlx-scales-shape", "mlx4", [f"{Q}.scales", "shape"])(_put(f"{Q}.scales", lambda x: x[:, :-1]))

    @case("mlx-bits-7", "mlx4", ["quantization.bits"])
    def _(t: Tensors, cfg: dict) -> None:
        cfg["quantization"]["bits"] = 7

    @case("mlx-mode-mxfp4", "mlx4", ["quantization.mode", "mxfp4"])
    def _(t: Tensors, cfg: dict) -> None:
        cfg["quantization"]["mode"] = "mxfp4"

    case("mxfp4-scales-shape", "mxfp4", [f"{E}_scales", "shape"])(_put(f"{E}_scales", lambda x: x[:, :, :0]))
    case("mxfp4-blocks-3d", "mxfp4", [f"{E}_blocks", "experts"])(_put(f"{E}_blocks", lambda x: x.reshape(2, 16, -1)))
    case("mxfp4-no-scales", "mxfp4", [f"{E}_blocks", "_scales"])(lambda t, _: t.pop(f"{E}_scales"))
    case("mxfp4-scales-dtype", "mxfp4", [f"{E}_scales", "U8"])(_put(f"{E}_scales", lambda x: x.float()))


_register()


def fuzz_base(seed: int, folder: Path) -> tuple[str, Path]:
    """A valid base of a random scheme here with 1-3 random changes: a quantization config field, a tensor's
    shape or dtype, or NaN/Inf/huge values in it. Returns (source, folder)."""
    rng = random.Random(seed)
    source = rng.choice(sorted(SOURCES))
    t, cfg = SOURCES[source]()
    ends = ("_packed", "_scale", "_zero_point", "_global_scale", ".scales", ".biases", "_blocks", "_scales")
    parts = sorted(k for k in t if k.endswith(ends) or (source == "mlx4" and _linear(k)))
    for _ in range(rng.randint(1, 3)):
        action = rng.choice(["config", "shape", "dtype", "value"])
        if action == "config":
            qcfg = cfg["quantization"] if source == "mlx4" else cfg["quantization_config"]
            target = qcfg
            weights = (
                ((qcfg.get("config_groups") or {}).get("group_0") or {})
                if isinstance(qcfg.get("config_groups"), dict)
                else {}
            )
            if isinstance(weights, dict) and isinstance(weights.get("weights"), dict) and rng.random() < 0.7:
                target = weights["weights"]
            field = rng.choice([*sorted(target), "group_size", "bits", "num_bits", "strategy", "mode"])
            target[field] = rng.choice([*JSON_VALUES, "group", "channel", "affine", "int", "float"])
            continue
        key = rng.choice(parts)
        x = t[key]
        if action == "shape":
            n = max(0, x.numel() + rng.choice([-x.numel(), -1, 1, x.numel(), 7]))
            t[key] = _reshaped(x, rng.choice([(n,), (1, n), (n, 1)]))
        elif action == "dtype":
            t[key] = _cast(x, rng.choice([torch.uint8, torch.int32, torch.float16, torch.float32, torch.float8_e4m3fn]))
        elif x.is_floating_point() and x.numel():
            x = x.clone() if x.element_size() > 1 else x.float()
            x.view(-1)[rng.randrange(x.numel())] = rng.choice([math.nan, math.inf, -1e38, 1e38])
            t[key] = x.to(t[key].dtype) if t[key].element_size() == 1 else x
    return source, _save(folder / f"fuzz-{seed}", t, cfg)


__all__ = ["CASES", "REQUANTIZABLE", "SOURCES", "fuzz_base"]
