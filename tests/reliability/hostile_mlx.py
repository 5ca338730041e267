"""Hostile mlx-lm adapters (formats/mlx.py): a valid adapter written by loratools from the PEFT fixture, then one
field or tensor broken per case."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hostile import HostileCase
from reliability_support import LLAMA_LORA

from loratools.files.safetensors_file import load_file, save_file

Q = "model.layers.0.self_attn.q_proj"


def _seed(folder: Path) -> Path:
    from loratools import load_adapter, save_adapter

    out = folder / "mlx-adapter"
    save_adapter(load_adapter(LLAMA_LORA), out, format="mlx")
    return out


def _config(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        out = _seed(folder)
        cfg = json.loads((out / "adapter_config.json").read_text())
        replaced = edit(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg if replaced is None else replaced))
        return out

    return build


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None], cfg: dict[str, Any] | None = None) -> Callable:
    def build(folder: Path) -> Path:
        out = _seed(folder)
        tensors, _ = load_file(out / "adapters.safetensors")
        tensors = {k: v.clone() for k, v in tensors.items()}
        edit(tensors)
        save_file(tensors, out / "adapters.safetensors")
        if cfg:
            config = json.loads((out / "adapter_config.json").read_text())
            config.update(cfg)
            (out / "adapter_config.json").write_text(json.dumps(config))
        return out

    return build


def _params(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        for k, v in changes.items():
            if v is _DROP:
                cfg["lora_parameters"].pop(k)
            else:
                cfg["lora_parameters"][k] = v

    return edit


_DROP = object()


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q}.lora_b"][0, 0] = float("nan")


def _switch(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q}.lora_a"] = t[f"{Q}.lora_a"][None].repeat(4, 1, 1)


def _magnitude(n: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if k.endswith(".lora_b")]:
            t[k.removesuffix("lora_b") + "m"] = torch.ones(n if k.startswith(Q) else t[k].shape[1])

    return edit


CASES = [
    HostileCase("mlx-config-no-scale", _config(_params(scale=_DROP)), ["lora_parameters.scale is missing"]),
    HostileCase("mlx-config-scale-nan", _config(_params(scale=float("nan"))), ["lora_parameters.scale is nan"]),
    HostileCase("mlx-config-scale-inf", _config(_params(scale=float("inf"))), ["lora_parameters.scale is inf"]),
    HostileCase("mlx-config-rank-string", _config(_params(rank="4")), ["lora_parameters.rank is '4'"]),
    HostileCase("mlx-config-rank-zero", _config(_params(rank=0)), ["lora_parameters.rank is 0"]),
    HostileCase("mlx-config-rank-other", _config(_params(rank=3)), ["lora_parameters.rank is 3"]),
    HostileCase("mlx-config-dropout-missing", _config(_params(dropout=_DROP)), ["lora_parameters.dropout"]),
    HostileCase("mlx-config-keys-number", _config(_params(keys=5)), ["lora_parameters.keys must be a list"]),
    HostileCase("mlx-config-full", _config(lambda c: c.update(fine_tune_type="full")), ["fine_tune_type 'full'"]),
    HostileCase("mlx-config-type-other", _config(lambda c: c.update(fine_tune_type="qlora")), ["'qlora'"]),
    HostileCase("mlx-config-layers-string", _config(lambda c: c.update(num_layers="all")), ["num_layers"]),
    HostileCase("mlx-config-not-object", _config(lambda c: [c]), ["expected a JSON object"]),
    HostileCase("mlx-config-no-parameters", _config(lambda c: c.pop("lora_parameters")), ["lora_parameters"]),
    HostileCase("mlx-nan-factor", _tensors(_nan), [f"{Q}.lora_b holds NaN/Inf"], validate_exit=1),
    HostileCase("mlx-switch-3d", _tensors(_switch), ["LoRASwitchLinear"]),
    HostileCase("mlx-stray-tensor", _tensors(lambda t: t.update({"model.norm.weight": torch.ones(32)})),
                ["model.norm.weight is not an adapter parameter"]),  # fmt: skip
    HostileCase("mlx-missing-b", _tensors(lambda t: t.pop(f"{Q}.lora_b")), [f"{Q}.lora_b is missing"]),
    HostileCase("mlx-int-factor", _tensors(lambda t: t.update({f"{Q}.lora_a": t[f"{Q}.lora_a"].to(torch.int32)})),
                [f"{Q}.lora_a is torch.int32"]),  # fmt: skip
    HostileCase("mlx-1d-factor", _tensors(lambda t: t.update({f"{Q}.lora_a": t[f"{Q}.lora_a"][0]})),
                [f"{Q}: lora_a"]),  # fmt: skip
    HostileCase("mlx-dora-without-m", _config(lambda c: c.update(fine_tune_type="dora")), ["no DoRA magnitude"]),
    HostileCase("mlx-m-without-dora", _tensors(_magnitude(32)), ["has a DoRA magnitude"]),
    HostileCase("mlx-m-wrong-length", _tensors(_magnitude(5), {"fine_tune_type": "dora"}), [f"{Q}.m has shape (5,)"]),
]
