"""ComfyUI "fp8 scaled" single files built from a 16-bit state dict, as ComfyUI's loaders read them.

The layout (ComfyUI ``comfy/model_detection.py`` ``model_config_from_unet``, ``comfy/utils.py``
``convert_old_quants``, the older ``comfy/ops.py`` ``scaled_fp8_ops``): a marker tensor ``<prefix>scaled_fp8``
whose dtype names the fp8 type (float32 means float8_e4m3fn), and per quantized Linear ``<layer>.weight`` in
that type with a float32 per-tensor ``<layer>.scale_weight`` (optionally ``<layer>.scale_input``). The reference
dequantization is ComfyUI's LoRA path (``model_patcher`` casts the weight to float32, then the op's
``convert_weight`` multiplies by ``scale_weight``): ``weight.to(float32) * scale_weight``. The quantizer here is
ComfyUI's ``TensorCoreFP8Layout.quantize(scale="recalculate")`` on a float32 tensor: scale = amax / 448,
q = clamp(W · (1 / scale), ±448) cast to float8_e4m3fn.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale_weight float32 ()) of ``w`` by ComfyUI's recalculate rule."""
    w = w.to(torch.float32)
    scale = torch.amax(w.abs()).to(torch.float32) / FP8_MAX
    q = torch.clamp(w * (1.0 / scale), min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ComfyUI's LoRA-patch dequantization: the weight cast to float32, times ``scale_weight`` in float32."""
    return q.to(torch.float32) * scale.to(torch.float32)


def is_quantized(key: str, t: torch.Tensor, only_blocks: bool = True) -> bool:
    """The tensors ComfyUI's scaled checkpoints hold in fp8: 2-D Linear weights (here: inside the blocks)."""
    if not key.endswith(".weight") or t.ndim != 2:
        return False
    return not only_blocks or "blocks." in key


def scaled_file(
    state: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.", marker: torch.dtype = torch.float8_e4m3fn,
    scale_input: bool = False, only_blocks: bool = True, rest: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``state`` (original-layout names, ``prefix`` already on them) as a ComfyUI fp8-scaled file: the blocks'
    Linear weights fp8 + scale_weight, everything else in ``rest``, and the ``scaled_fp8`` marker."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if is_quantized(k, v, only_blocks):
            q, s = quantize(v)
            layer = k[: -len(".weight")]
            out[k] = q
            out[f"{layer}.scale_weight"] = s
            if scale_input:
                out[f"{layer}.scale_input"] = torch.tensor(1.0)
        else:
            out[k] = v.to(rest)
    out[f"{prefix}scaled_fp8"] = torch.empty(0, dtype=marker)
    return out


def dequantized_state(scaled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 model ComfyUI computes with: fp8 weights dequantized, companions and marker dropped."""
    out = {}
    for k, v in scaled.items():
        if k.endswith(("scale_weight", "scale_input", "scaled_fp8")):
            continue
        scale = scaled.get(k[: -len(".weight")] + ".scale_weight") if k.endswith(".weight") else None
        out[k] = dequantize(v, scale) if scale is not None else v.to(torch.float32)
    return out


__all__ = ["FP8_MAX", "dequantize", "dequantized_state", "is_quantized", "quantize", "scaled_file"]
