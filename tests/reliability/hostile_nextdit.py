"""Hostile Z-Image, Lumina2, Chroma and HiDream LoRA files (issue 21): small kohya/ComfyUI files built from random
factors of the right shapes, broken in one place each. Every command reads the file first and refuses it with one
line naming the file and the tensor (the tiny-model variants, merged into their pipelines: tests/dit/
test_nextdit_hostile.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from hostile import ADAPTER_COMMANDS, HostileCase

Tensors = dict[str, torch.Tensor]


def _pair(stem: str, rows: int, cols: int, rank: int = 2, down: str = "lora_down", up: str = "lora_up") -> Tensors:
    g = torch.Generator().manual_seed(len(stem))
    return {f"{stem}.{down}.weight": torch.randn(rank, cols, generator=g),
            f"{stem}.{up}.weight": torch.randn(rows, rank, generator=g),
            f"{stem}.alpha": torch.tensor(2.0)}  # fmt: skip


def _file(name: str, tensors: Callable[[], Tensors]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.safetensors"
        save_file(tensors(), str(path))
        return path

    return build


def _nan(t: Tensors, key: str) -> Tensors:
    t[key] = t[key].clone()
    t[key].view(-1)[0] = float("nan")
    return t


_Z = "lora_unet_layers_0_attention"
_C = "diffusion_model.double_blocks.0.img_attn.qkv"
_H = "lora_unet_double_stream_blocks_0_block_attn1_to_q_t"
COMMANDS = {k: v for k, v in ADAPTER_COMMANDS.items() if k in ("info", "validate", "convert")}
#: validate reports a file it cannot read as a finding (exit 1), the other commands refuse it (exit 2)
CASES = [
    HostileCase("nextdit-zimage-qkv-thirds", _file("zimage-qkv", lambda: {**_pair(f"{_Z}_to_q", 32, 32),
                **_pair(f"{_Z}_qkv", 95, 32)}), ["layers.0.attention.qkv", "95 rows"], COMMANDS, 1),  # fmt: skip
    HostileCase("nextdit-lumina2-gqa-odd", _file("lumina2-qkv", lambda: {**_pair(f"{_Z}_qkv", 63, 32),
                **_pair("lora_unet_layers_0_adaLN_modulation_1", 128, 32)}), ["attention.qkv", "63 rows"],
                COMMANDS, 1),  # fmt: skip
    HostileCase("nextdit-chroma-nan", _file("chroma-nan", lambda: _nan({**_pair(_C, 48, 16),
                **_pair("diffusion_model.distilled_guidance_layer.in_proj", 16, 8)}, f"{_C}.lora_down.weight")),
                [_C, "NaN"], COMMANDS, 1),  # fmt: skip
    HostileCase("nextdit-hidream-rank", _file("hidream-rank", lambda: {**_pair(_H, 16, 16),
                f"{_H}.lora_up.weight": torch.ones(16, 3)}), ["attn1.to_q_t", "rank"], COMMANDS, 1),  # fmt: skip
]
