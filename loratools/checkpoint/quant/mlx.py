"""MLX affine-quantized checkpoints (mlx-lm ``convert -q``), read in plain torch.

config.json holds ``"quantization": {"group_size", "bits"[, "mode"]}`` (mlx-lm writes the same dict as
``quantization_config``, with no ``quant_method``); per-module overrides sit in the same dict under the
module's path. Each quantized module (Linear, Embedding, MoE ``SwitchLinear``) stores ``<module>.weight``
uint32 (..., in·bits/32): the codes as one little-endian bit stream (element i at bits i·bits ... of the
row; 3/5/6-bit codes straddle words), and ``.scales`` / ``.biases`` (..., in/group_size) in the model's
dtype. W = scale · q + bias, each operation rounded to that dtype, as ``mx.dequantize`` computes it
(bit-equal, tests/quant/test_mlx.py).

``--requantize`` follows mlx's CPU ``quantize`` (``mlx/backend/cpu/quantized.cpp``): per group the end with
the larger magnitude becomes an exact code (scale = edge / round(edge / step)), bias = that edge, codes
rounded to nearest and clamped, all in fp32 from the weight cast to the model's dtype; tests check it
against ``mx.quantize``. Only ``mode: affine`` is read (mxfp4/nvfp4/mxfp8 MLX modes are refused).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loratools.checkpoint.quant import checks
from loratools.checkpoint.quant.scheme import QuantScheme
from loratools.errors import FormatError, UnsupportedError

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.quant.layout import QuantizedCheckpoint, QuantTensor

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
_HINT = "dequantize it with mlx-lm's convert (its dequantize option) and merge into the 16-bit copy"


def _settings(q: Any, where: str, name: str) -> dict[str, Any]:
    if not isinstance(q, dict):
        raise FormatError(f"{where}: {name} is {q!r}, not an object with group_size and bits", hint=checks.DAMAGED)
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise UnsupportedError(f"{where}: {name}.mode is {mode!r}; loratools reads MLX affine quantization",
                               hint=_HINT, path=where)  # fmt: skip
    bits, group = q.get("bits"), q.get("group_size")
    if bits not in BITS or isinstance(bits, bool):
        raise FormatError(f"{where}: {name}.bits is {bits!r}; MLX quantizes to {BITS} bits", hint=checks.DAMAGED)
    if group not in GROUPS or isinstance(group, bool):
        raise FormatError(f"{where}: {name}.group_size is {group!r}; MLX groups are {GROUPS}", hint=checks.DAMAGED)
    return {"bits": bits, "group_size": group}


class MlxAffine(QuantScheme):
    names = ("mlx-affine",)
    requantizable = ("mlx-affine",)

    def detect(self, qcfg: dict[str, Any], config: dict[str, Any]) -> str | None:
        if "quant_method" in qcfg or not {"group_size", "bits"} <= set(qcfg):
            return None
        return "mlx-affine"

    def discover(self, cp: QuantizedCheckpoint, keys: set[str]) -> None:
        from loratools.checkpoint.quant.layout import QuantTensor

        q = cp.config_full.get("quantization") if isinstance(cp.config_full.get("quantization"), dict) else cp.qcfg
        default = _settings(q, cp.config_at, "quantization")
        for k in sorted(keys):
            if not k.endswith(".scales"):
                continue
            module = k.removesuffix(".scales")
            parts = {"weight": f"{module}.weight", "scales": k, "biases": f"{module}.biases"}
            missing = [r for r, key in parts.items() if key not in keys]
            if missing:
                raise FormatError(f"{cp._at(k)}: an MLX quantized module has {module}.weight, .scales and "
                                  f".biases; {parts[missing[0]]} is missing", hint=checks.DAMAGED)  # fmt: skip
            override = q.get(module)
            if override is False:
                continue
            s = _settings(override, cp.config_at, f"quantization.{module}") if isinstance(override, dict) else default
            p = cp._parts(parts)
            p.want("weight", ("U32",))
            w = p.info("weight")
            if not w.shape:
                p.refuse("weight", "is a scalar; packed MLX weights have at least one row")
            n_in = w.shape[-1] * 32 // s["bits"]
            if (w.shape[-1] * 32) % s["bits"] or n_in % s["group_size"]:
                p.refuse("weight", f"has {w.shape[-1]} words per row: not whole {s['group_size']}-value groups of "
                         f"{s['bits']}-bit codes")  # fmt: skip
            grid = (*w.shape[:-1], n_in // s["group_size"])
            p.want("scales", checks.FLOATS[:3], shape=grid)
            p.want("biases", (p.info("scales").dtype,), shape=grid)
            shape = (*w.shape[:-1], n_in)
            cp.tensors[parts["weight"]] = QuantTensor(parts["weight"], "mlx-affine", parts, shape,
                                                      p.info("scales").dtype, s)  # fmt: skip

    def dequantize(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype, at: Callable[[str], str]
    ) -> torch.Tensor:
        return dequantize_affine(parts["weight"], parts["scales"], parts["biases"], t.settings["bits"])

    def value_range(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], at: Callable[[str], str]
    ) -> tuple[str, float, float]:
        from loratools.model.finite import first_nonfinite

        b = parts["biases"]
        first = first_nonfinite(b)
        if first is not None:
            from loratools.errors import NumericError

            raise NumericError(
                f"{at('biases')} holds NaN/Inf (first at index {first}); dequantizing {t.key} would write it",
                hint="the quantized checkpoint is damaged; nothing was written",
            )
        top_b = float(b.float().abs().max()) if b.numel() else 0.0
        top_s = float(parts["scales"].float().abs().max()) if parts["scales"].numel() else 0.0
        return "scales", top_s * (2 ** t.settings["bits"] - 1) + top_b, 1.0

    def requantize(
        self, t: QuantTensor, merged: torch.Tensor, old: dict[str, torch.Tensor], where: str
    ) -> dict[str, torch.Tensor]:
        w, s, b = quantize_affine(merged.to(old["scales"].dtype), t.settings["bits"], t.settings["group_size"])
        return {**old, "weight": w.reshape(old["weight"].shape), "scales": s, "biases": b}


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint32 (..., m) -> codes (..., n): one little-endian bit stream per row."""
    import torch

    lead = words.shape[:-1]
    u8 = words.contiguous().view(torch.uint8).to(torch.int32)  # little-endian bytes, as mlx writes them
    if 8 % bits == 0:
        codes = (u8.unsqueeze(-1) >> torch.arange(0, 8, bits, dtype=torch.int32)) & ((1 << bits) - 1)
        return codes.reshape(*lead, -1)[..., :n]
    bitstream = ((u8.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(*lead, -1)
    weights = 1 << torch.arange(bits, dtype=torch.int32)
    return (bitstream[..., : n * bits].reshape(*lead, n, bits) * weights).sum(-1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (..., n) -> uint32 (..., n·bits/32), the inverse of :func:`unpack`."""
    import torch

    lead, n = codes.shape[:-1], codes.shape[-1]
    bitstream = ((codes.to(torch.int32).unsqueeze(-1) >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(*lead, -1)
    byte_bits = bitstream.reshape(*lead, -1, 8) << torch.arange(8, dtype=torch.int32)
    u8 = byte_bits.sum(-1).to(torch.uint8)
    return u8.reshape(*lead, n * bits // 32, 4).contiguous().view(torch.int32).view(torch.uint32).reshape(*lead, -1)


def dequantize_affine(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """scale · q + bias per group, each step rounded to the scales' dtype (``mx.dequantize``)."""
    import torch

    dt = scales.dtype
    groups = scales.shape[-1]
    n = words.shape[-1] * 32 // bits
    q = unpack(words, bits, n).to(torch.float32).reshape(*scales.shape, n // groups)
    w = (q * scales.to(torch.float32).unsqueeze(-1)).to(dt).to(torch.float32) + biases.to(torch.float32).unsqueeze(-1)
    return w.to(dt).reshape(*scales.shape[:-1], n)


def quantize_affine(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(words uint32, scales, biases) of ``w`` as mlx's CPU quantizer makes them (fp32 math, stored in w's dtype)."""
    import torch

    dt, n = w.dtype, w.shape[-1]
    g = w.to(torch.float32).reshape(*w.shape[:-1], n // group, group)
    n_bins = float(2**bits - 1)
    w_max, w_min = g.amax(-1), g.amin(-1)
    mask = w_min.abs() > w_max.abs()
    scale = torch.clamp((w_max - w_min) / n_bins, min=1e-7)
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)  # rint: ties to even, like torch.round
    exact = q0 != 0
    scale = torch.where(exact, edge / torch.where(exact, q0, 1.0), scale)
    bias = torch.where(exact, edge, torch.zeros_like(edge))
    q = torch.clamp(torch.round((g - bias.unsqueeze(-1)) / scale.unsqueeze(-1)), 0, n_bins).to(torch.int32)
    return pack(q.reshape(*w.shape[:-1], n), bits), scale.to(dt), bias.to(dt)


SCHEME = MlxAffine()
