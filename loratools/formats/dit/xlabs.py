"""XLabs-AI Flux LoRAs (x-flux ``train_flux_lora_deepspeed.py``): one LoRA per attention processor.

x-flux's ``DoubleStreamBlockLoraProcessor`` holds ``qkv_lora1``/``proj_lora1`` (the image stream's ``img_attn.qkv``
and ``img_attn.proj``) and ``qkv_lora2``/``proj_lora2`` (the text stream's ``txt_attn.qkv``/``txt_attn.proj``);
``SingleStreamBlockLoraProcessor`` holds ``qkv_lora`` (added to the first ``3·D`` rows of ``linear1``: q, k, v,
not the MLP) and ``proj_lora`` (``linear2``). Tensors are ``…processor.<name>.down.weight`` / ``.up.weight``,
optionally under ``diffusion_model.``, without alphas: x-flux's ``LoRALinearLayer`` scales by 1 when
``network_alpha`` is None, and diffusers loads these files without alphas too (alpha = rank).

The names follow diffusers' ``loaders/lora_conversion_utils.py`` ``_convert_xlabs_flux_lora_to_diffusers``: a qkv
LoRA is split into ``to_q/to_k/to_v`` (``add_q_proj…`` for ``qkv_lora2``) by thirds of its rows, A shared — exact.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import FormatError, ShapeError, ValidationError
from loratools.model.adapter import LoraModule
from loratools.model.fused import split

if TYPE_CHECKING:
    import torch

_KEY = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)\.(down|up)\.weight$")
#: processor LoRA -> diffusers paths inside the block (several: thirds of its rows)
_DOUBLE = {
    "qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "proj_lora1": ("attn.to_out.0",),
    "proj_lora2": ("attn.to_add_out",),
}
_SINGLE = {"qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora": ("proj_out",)}


def is_xlabs(key: str) -> bool:
    """Whether ``key`` names an x-flux attention-processor LoRA tensor."""
    bare = key.removeprefix("diffusion_model.")
    return bare.startswith(("double_blocks.", "single_blocks.")) and ".processor." in bare


def read_xlabs(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    """The diffusers-named Flux modules (no ``transformer.`` prefix) of an XLabs file; FormatError naming the
    first tensor that is none of its names."""
    from loratools.model.finite import require_finite

    parts: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        table = (_DOUBLE if m.group(1) == "double_blocks" else _SINGLE) if m else {}
        if m is None or m.group(3) not in table:
            raise FormatError(
                f"{path}: tensor {key!r} is not an XLabs Flux LoRA tensor (expected double_blocks.N.processor."
                "{qkv,proj}_lora{1,2}.{down,up}.weight or single_blocks.N.processor.{qkv,proj}_lora.…)",
                path=path,
            )
        if not t.is_floating_point():
            raise FormatError(f"{path}: tensor {key} is {t.dtype}; LoRA tensors must be floating point", path=path)
        if not t.is_meta:
            require_finite(t, key, path)
        parts.setdefault((m.group(1), m.group(2), m.group(3)), {})[m.group(4)] = t
    out: dict[str, LoraModule] = {}
    for (kind, n, proc), p in sorted(parts.items()):
        name = f"{kind}.{n}.processor.{proc}"
        for role in ("down", "up"):
            if role not in p:
                raise ValidationError(f"{path}: XLabs module {name} has no {role}.weight tensor", path=path)
            if p[role].ndim != 2:
                raise ShapeError(f"{path}: {name}.{role}.weight is {tuple(p[role].shape)}; a LoRA factor is 2-D",
                                 path=path)  # fmt: skip
        try:
            module = LoraModule(down=p["down"], up=p["up"], alpha=float(p["down"].shape[0]))
        except ValidationError as exc:
            raise type(exc)(f"{path}: module {name}: {exc.message}", hint=exc.hint, path=path) from None
        block = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
        targets = (_DOUBLE if kind == "double_blocks" else _SINGLE)[proc]
        if len(targets) == 1:
            out[f"{block}.{n}.{targets[0]}"] = module
            continue
        if module.out_features % 3:
            raise ShapeError(f"{path}: {name}.up.weight has {module.out_features} rows; an XLabs qkv LoRA has q, k "
                             "and v rows (a multiple of 3)", path=path)  # fmt: skip
        third = module.out_features // 3
        for target, piece in zip(targets, split(module, [third] * 3, f"{path}: {name}"), strict=True):
            if piece is not None:
                out[f"{block}.{n}.{target}"] = piece
    return out


__all__ = ["is_xlabs", "read_xlabs"]
