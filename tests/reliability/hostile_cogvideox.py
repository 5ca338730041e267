"""Hostile CogVideoX (and the LTX-Video names it shares) LoRA files (issue 21): small CogVideoX-Fun kohya /
ComfyUI, finetrainers (lora_config metadata) and DiffSynth-Studio CogDiT files built from random factors, broken in
one place each (NaN, ranks that disagree, a missing half, a truncated header, damaged metadata), and the layouts
refused by name (THUDM SAT matrix_A/matrix_B, attn1-only names no base tells, kohya text encoders on HiDream). Every
command reads the file first and refuses it with one line naming the file and the tensor (or the metadata field).
Shapes against a CogVideoX base: tests/dit/test_cogvideox_trainers.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from hostile import ADAPTER_COMMANDS, HostileCase
from hostile_nextdit import _file

Tensors = dict[str, torch.Tensor]
_Q = "lora_unet__transformer_blocks_0_attn1_to_q"
_N = "lora_unet__transformer_blocks_0_norm2_linear"


def _pair(stem: str, rows: int = 16, cols: int = 16, rank: int = 2, down: str = "lora_down", up: str = "lora_up",
          alpha: float = 2.0) -> Tensors:  # fmt: skip
    g = torch.Generator().manual_seed(len(stem))
    out = {f"{stem}.{down}.weight": torch.randn(rank, cols, generator=g),
           f"{stem}.{up}.weight": torch.randn(rows, rank, generator=g)}  # fmt: skip
    if down == "lora_down":
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def _fun(**broken: torch.Tensor) -> Callable[[], Tensors]:
    return lambda: {**_pair(_Q), **_pair(_N, 96), **broken}


def _nan() -> Tensors:
    t = {**_pair(_Q), **_pair(_N, 96)}
    t[f"{_Q}.lora_up.weight"].view(-1)[0] = float("nan")
    return t


def _sat() -> Tensors:
    stem = "model.diffusion_model.transformer.layers.0.attention"
    out: Tensors = {}
    for i in range(3):
        out[f"{stem}.query_key_value.matrix_A.{i}"] = torch.randn(2, 16)
        out[f"{stem}.query_key_value.matrix_B.{i}"] = torch.randn(16, 2)
    return out


#: finetrainers (diffusers names + its lora_config metadata), DiffSynth-Studio's CogDiT names (formats/dit/cogvideox.py)
_FT = "transformer.transformer_blocks.0.attn1.to_q"
_DS = "blocks.0.attn1.to_out"


def _ft_file(name: str, lora_config: str, **broken: torch.Tensor) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.safetensors"
        tensors = {**_pair(_FT, down="lora_A", up="lora_B"), **broken}
        save_file(tensors, str(path), metadata={"lora_config": lora_config})
        return path

    return build


def _ds(**broken: torch.Tensor | None) -> Callable[[], Tensors]:
    def tensors() -> Tensors:
        t = {**_pair(_DS, down="lora_A.default", up="lora_B.default"),
             **_pair("blocks.0.ff.0", 64, down="lora_A.default", up="lora_B.default")}  # fmt: skip
        for k, v in broken.items():
            if v is None:
                t.pop(k)
            else:
                t[k] = v
        return t

    return tensors


def _ds_nan() -> Tensors:
    t = _ds()()
    t[f"{_DS}.lora_B.default.weight"].view(-1)[0] = float("nan")
    return t


def _truncated(name: str, tensors: Callable[[], Tensors]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = _file(name, tensors)(folder)
        data = path.read_bytes()
        path.write_bytes(data[: 8 + int.from_bytes(data[:8], "little") // 2])  # the header cut in half
        return path

    return build


def _cfg(**fields: object) -> str:
    return json.dumps({"r": 2, "lora_alpha": 4, "init_lora_weights": True, "target_modules": "to_q", **fields})


COMMANDS = {k: v for k, v in ADAPTER_COMMANDS.items() if k in ("info", "validate", "convert")}
CASES = [
    HostileCase("cogvideox-fun-nan", _file("cog-nan", _nan), [f"{_Q}.lora_up.weight", "NaN"], COMMANDS, 1),
    HostileCase("cogvideox-fun-rank", _file("cog-rank", _fun(**{f"{_Q}.lora_up.weight": torch.ones(16, 3)})),
                ["attn1.to_q", "rank"], COMMANDS, 1),  # fmt: skip
    HostileCase("cogvideox-fun-alpha-vector", _file("cog-alpha", _fun(**{f"{_Q}.alpha": torch.ones(2)})),
                ["attn1.to_q", "alpha"], COMMANDS),  # fmt: skip
    HostileCase("cogvideox-fun-unknown-module", _file("cog-unknown", lambda: {**_pair(_N, 96),
                **_pair("lora_unet__transformer_blocks_0_attn1_to_qq")}), ["attn1_to_qq", "CogVideoX"],
                COMMANDS),  # fmt: skip
    HostileCase("cogvideox-fun-int-factor", _file("cog-int", _fun(**{f"{_Q}.lora_down.weight":
                torch.ones(2, 16, dtype=torch.int32)})), [f"{_Q}.lora_down.weight", "floating"], COMMANDS),
    HostileCase("cogvideox-sat-layout", _file("cog-sat", _sat), ["query_key_value.matrix_A", "SAT layout"],
                COMMANDS),  # fmt: skip
    HostileCase("cogvideox-ltx-attn1-only", _file("attn1-only", lambda: _pair(
                "diffusion_model.transformer_blocks.0.attn1.to_q", down="lora_A", up="lora_B")),
                ["attn1", "LTX-Video and CogVideoX share"], COMMANDS),  # fmt: skip
    HostileCase("cogvideox-hidream-kohya-te", _file("hidream-te", lambda: {
                **_pair("lora_unet_double_stream_blocks_0_block_attn1_to_q_t"),
                **_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")}),
                ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "HiDream"], COMMANDS),  # fmt: skip
    HostileCase("cogvideox-finetrainers-config-json", _ft_file("ft-json", "{r: 2,"), ["lora_config", "not valid JSON"],
                COMMANDS),  # fmt: skip
    HostileCase("cogvideox-finetrainers-alpha-nan", _ft_file("ft-nan-alpha", _cfg(lora_alpha=float("nan"))),
                ["lora_config", "lora_alpha", "nan"], COMMANDS),  # fmt: skip
    HostileCase("cogvideox-finetrainers-alpha-string", _ft_file("ft-str-alpha", _cfg(lora_alpha="64")),
                ["lora_config", "lora_alpha", "'64'"], COMMANDS),  # fmt: skip
    HostileCase("cogvideox-finetrainers-alpha-pattern", _ft_file("ft-pattern", _cfg(alpha_pattern=["to_q", 4])),
                ["lora_config", "alpha_pattern"], COMMANDS),  # fmt: skip
    HostileCase("cogvideox-finetrainers-rank", _ft_file("ft-rank", _cfg(r=4)),  # tensors of rank 2
                [_FT, "rank 2", "r = 4"], COMMANDS),  # fmt: skip
    HostileCase("cogvideox-finetrainers-nan", _ft_file("ft-nan", _cfg(), **{f"{_FT}.lora_B.weight":
                torch.full((16, 2), float("nan"))}), [f"{_FT}.lora_B", "NaN"], COMMANDS, 1),  # fmt: skip
    HostileCase("cogvideox-finetrainers-missing-half", _ft_file("ft-half", _cfg(), **{
                "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.ones(2, 16)}),
                ["transformer_blocks.0.attn1.to_k", "up"], COMMANDS, 1),  # fmt: skip
    HostileCase("cogvideox-diffsynth-nan", _file("ds-nan", _ds_nan), [f"{_DS}.lora_B.default.weight", "NaN"],
                COMMANDS, 1),  # fmt: skip
    HostileCase("cogvideox-diffsynth-missing-half", _file("ds-half", _ds(**{"blocks.0.ff.0.lora_B.default.weight":
                None})), ["blocks.0.ff.0", "lora_up (B)"], COMMANDS, 1),  # fmt: skip
    HostileCase("cogvideox-diffsynth-rank", _file("ds-rank", _ds(**{f"{_DS}.lora_B.default.weight":
                torch.ones(16, 3)})), ["attn1.to_out", "rank"], COMMANDS, 1),  # fmt: skip
    HostileCase("cogvideox-diffsynth-truncated", _truncated("ds-cut", _ds()), ["header"], COMMANDS),
]
