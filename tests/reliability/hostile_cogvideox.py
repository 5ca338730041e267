"""Hostile CogVideoX (and the LTX-Video names it shares) LoRA files (issue 21): small CogVideoX-Fun kohya /
ComfyUI files built from random factors, broken in one place each, and the layouts refused by name (THUDM SAT
matrix_A/matrix_B, attn1-only names no base tells, kohya text encoders on HiDream). Every command reads the file
first and refuses it with one line naming the file and the tensor."""

from __future__ import annotations

from collections.abc import Callable

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
]
