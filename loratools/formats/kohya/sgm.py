"""Original (SGM/LDM) UNet names for a diffusers UNet's modules, so kohya SDXL files resolve.

sd-scripts trains SDXL on its own copy of the original UNet, whose modules are ``input_blocks.N.M``,
``middle_block.N`` and ``output_blocks.N.M`` with resnet parts ``in_layers.2`` / ``emb_layers.1`` /
``out_layers.3`` / ``skip_connection`` and downsamplers ``op``. A diffusers UNet has the same layers under
``down_blocks`` / ``mid_block`` / ``up_blocks``; the block numbering follows from ``layers_per_block``.
"""

from __future__ import annotations

import re
from typing import Any

_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}  # fmt: skip
_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _RESNET_PARTS.get(head, head) + (f".{tail}" if tail else "")


def sgm_path(path: str, config: dict[str, Any]) -> str | None:
    """The original-UNet path of diffusers UNet module ``path``, or None when it has none."""
    if path in _TOP:
        return _TOP[path]
    layers = config.get("layers_per_block")
    if not isinstance(layers, int):
        return None
    up_types = config.get("up_block_types") or []
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", path)
    if m:
        kind, block, part, idx, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            base = 1 + block * (layers + 1)
            if part == "resnets":
                return f"input_blocks.{base + idx}.0.{_resnet(rest)}"
            if part == "attentions":
                return f"input_blocks.{base + idx}.1.{rest}"
            return f"input_blocks.{base + layers}.0.{rest.replace('conv', 'op', 1)}"
        base = block * (layers + 1)
        if part == "resnets":
            return f"output_blocks.{base + idx}.0.{_resnet(rest)}"
        if part == "attentions":
            return f"output_blocks.{base + idx}.1.{rest}"
        has_attention = block < len(up_types) and "CrossAttn" in str(up_types[block])
        return f"output_blocks.{base + layers}.{2 if has_attention else 1}.{rest}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if idx == 0 else 2}.{_resnet(rest)}"
    return None
