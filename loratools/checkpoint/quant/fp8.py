"""FP8 (float8_e4m3fn) weights with block-wise or per-tensor scales, in plain torch.

Block-scaled checkpoints (DeepSeek-V3, Qwen3-FP8, transformers' ``FineGrainedFP8Config``) store
``weight`` as float8_e4m3fn and ``weight_scale_inv`` with one fp32 scale per ``weight_block_size``
tile (``[128, 128]``; the grid is rounded up, so edge tiles may be short): W = q · s[tile], in fp32,
cast once. Per-tensor checkpoints store one scale (``weight_scale_inv`` or compressed-tensors'
``weight_scale``). Requantization follows transformers' ``Fp8Quantize``: per tile, s = max|W| / 448
(kept as the stored reciprocal), q = clamp(W / s, ±448) rounded to float8_e4m3fn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratools.errors import FormatError

if TYPE_CHECKING:
    import torch

FP8_MAX = 448.0


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return scale.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Scale-grid shape of a 2-D weight: tiles rounded up at the edges."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype, where: str
):  # noqa: ANN201
    """``weight`` (float8) times its scales in fp32, cast to ``dtype``."""
    import torch

    w = weight.to(torch.float32)
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    if w.ndim == 3 and s.ndim == 3 and w.shape[0] == s.shape[0]:  # fused experts: one grid per expert
        return torch.stack([dequantize(w[e], s[e], block, dtype, where) for e in range(w.shape[0])])
    if w.ndim != 2 or s.ndim != 2:
        raise FormatError(f"{where}: FP8 weight {tuple(w.shape)} with scales {tuple(s.shape)} is not a 2-D tile grid")
    if block is None:  # derive the tile from the grid (exact division only)
        if w.shape[0] % s.shape[0] or w.shape[1] % s.shape[1]:
            raise FormatError(f"{where}: FP8 scale grid {tuple(s.shape)} does not divide the weight {tuple(w.shape)}")
        block = (w.shape[0] // s.shape[0], w.shape[1] // s.shape[1])
    if tuple(s.shape) != grid(tuple(w.shape), block):
        raise FormatError(
            f"{where}: FP8 scale grid {tuple(s.shape)} does not fit weight {tuple(w.shape)} in {list(block)} tiles"
        )
    return (w * _expand(s, tuple(w.shape), block)).to(dtype)


def quantize(
    weight: torch.Tensor, block: tuple[int, int] | None, scale_dtype: torch.dtype, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q float8_e4m3fn, scale_inv)`` of ``weight``: per tile with ``block``, else one per-tensor scale."""
    import torch

    w = weight.to(torch.float32)
    if w.ndim == 3 and block is not None:  # fused experts: one grid per expert
        pairs = [quantize(w[e], block, scale_dtype, ue8m0) for e in range(w.shape[0])]
        return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
    if block is None:
        max_abs = w.abs().amax()
        scales = torch.where(max_abs > 0, FP8_MAX / torch.where(max_abs > 0, max_abs, 1.0), 1.0)
        inv = (1.0 / scales).to(torch.float32)
        q = torch.clamp(w * scales, min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn)
        return q, inv.to(scale_dtype)
    rows, cols = w.shape
    gr, gc = grid((rows, cols), block)
    pad = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32)
    pad[:rows, :cols] = w
    tiles = pad.reshape(gr, block[0], gc, block[1])
    max_abs = tiles.abs().amax(dim=(1, 3))
    safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = torch.where(max_abs > 0, FP8_MAX / safe, torch.ones_like(max_abs))
    inv = (1.0 / scales).to(torch.float32)
    if ue8m0:  # power-of-two scales: quantize with the exact reciprocal of the stored one
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scales = 1.0 / inv
    scaled = tiles * scales[:, None, :, None]
    q = torch.clamp(scaled, min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(gr * block[0], gc * block[1])[:rows, :cols].contiguous()
    return q, inv.to(scale_dtype)
