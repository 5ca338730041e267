"""ComfyUI "fp8 scaled" single files (``flux_dev_fp8_scaled``, ``wan2.1_*_fp8_scaled``, ...): float8 Linear
weights with one float32 ``scale_weight`` each, marked by a ``scaled_fp8`` tensor. No config.json: the tensor
names say it (:meth:`ComfyScaledFp8.implied_config`).

On disk, as ComfyUI reads it (``comfy/model_detection.py`` ``model_config_from_unet``, ``comfy/utils.py``
``convert_old_quants``, the older ``comfy/ops.py`` ``scaled_fp8_ops``): ``<prefix>scaled_fp8`` (``prefix`` is
the diffusion model's, ``model.diffusion_model.`` or empty), whose dtype is the weights' fp8 type (a float32
marker means float8_e4m3fn; two elements ask for full-precision matrix multiplies); per quantized Linear under
that prefix ``<layer>.weight`` in that fp8 type, ``<layer>.scale_weight`` (one value) and optionally
``<layer>.scale_input``. Everything else (norms, biases, embeddings, layers left in 16-bit) passes through.

W = weight · scale_weight, computed as ComfyUI's LoRA patching does (the weight cast to float32, times the
scale in float32: ``convert_weight``), then cast once to the file's 16-bit dtype, which is also what ComfyUI's
runtime dequantization (``TensorCoreFP8Layout.dequantize``) computes. ``--requantize`` writes float8_e4m3fn
with a new per-tensor scale by ComfyUI's own quantizer, ``TensorCoreFP8Layout.quantize(scale="recalculate")``:
scale = max|W| / 448, q = clamp(W · (1/scale), ±448) rounded to nearest (ComfyUI rounds a LoRA-patched weight
stochastically, seeded per key; loratools rounds to nearest, its quantizer's seed-0 branch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loratools.checkpoint.quant import checks
from loratools.checkpoint.quant.scheme import QuantScheme
from loratools.errors import FormatError, NumericError, UnsupportedError

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.quant.layout import QuantizedCheckpoint, QuantTensor

NAME = "comfy-scaled-fp8"
MARKER = "scaled_fp8"
FP8 = ("F8_E4M3", "F8_E5M2")
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
_PARTS = ("scale_weight", "scale_input")


def markers(keys: Any) -> list[str]:
    return sorted(k for k in keys if k == MARKER or k.endswith("." + MARKER))


class ComfyScaledFp8(QuantScheme):
    names = (NAME,)
    requantizable = (NAME,)

    def implied_config(self, keys: set[str], info: Callable[[str], Any]) -> dict[str, Any] | None:
        """A file with a ``scaled_fp8`` marker, or fp8 weights with a ``scale_weight`` beside them (refused
        in :meth:`discover`: without the marker ComfyUI ignores the scales)."""
        found = markers(keys)
        if found:
            return {"quant_method": NAME, "markers": found}
        for k in keys:
            if k.endswith(".scale_weight") and f"{k[: -len('.scale_weight')]}.weight" in keys:
                if info(f"{k[: -len('.scale_weight')]}.weight").dtype in FP8:
                    return {"quant_method": NAME, "markers": []}
        return None

    def detect(self, qcfg: dict[str, Any], config: dict[str, Any]) -> str | None:
        return NAME if qcfg.get("quant_method") == NAME else None

    def discover(self, cp: QuantizedCheckpoint, keys: set[str]) -> None:
        from loratools.checkpoint.quant.layout import QuantTensor

        found = markers(keys)
        if not found:
            k = min(k for k in keys if k.endswith(".scale_weight"))
            raise FormatError(
                f"{cp._at(k)}: an fp8 weight with a scale_weight but no scaled_fp8 marker tensor in the file; "
                "ComfyUI reads such a file without the scales, loratools does not guess",
                hint="add the marker (an empty float8_e4m3fn tensor named <prefix>scaled_fp8) or re-save the file "
                "with its quantizer",
            )
        scopes = {m: m[: -len(MARKER)] for m in found}
        fp8_types = {m: _marker_type(cp, m) for m in found}
        dtype = _compute_dtype(cp, keys)
        first = True
        for k in sorted(keys):
            if not k.endswith(".weight"):
                continue
            marker = next((m for m, p in sorted(scopes.items(), key=lambda x: -len(x[1])) if k.startswith(p)), None)
            layer = k[: -len(".weight")]
            has_scale = f"{layer}.scale_weight" in keys
            if marker is None or (not has_scale and cp.raw_info(k).dtype not in FP8):
                continue
            parts = {"weight": k}
            if not has_scale:
                raise FormatError(
                    f"{cp._at(k)} is stored as {cp.raw_info(k).dtype} with no {layer}.scale_weight beside it; in "
                    f"a ComfyUI fp8-scaled file every fp8 weight has its scale",
                    hint=checks.DAMAGED,
                )
            parts["scale"] = f"{layer}.scale_weight"
            if f"{layer}.scale_input" in keys:
                parts["scale_input"] = f"{layer}.scale_input"
            if first:  # the markers are hidden with the first module's parts (a 16-bit output drops them)
                parts.update({f"marker{i}": m for i, m in enumerate(found)})
                first = False
            p = cp._parts(parts)
            p.want("weight", (fp8_types[marker],))
            info = p.info("weight")
            if len(info.shape) != 2:
                p.refuse("weight", f"has shape {list(info.shape)}; ComfyUI scales Linear weights (2-D) only")
            p.want("scale", checks.FLOATS, numel=1)
            if "scale_input" in parts:
                p.want("scale_input", checks.FLOATS, numel=1)
            settings = {"fp8_dtype": fp8_types[marker], "marker": marker, "bits": 8}
            cp.tensors[k] = QuantTensor(k, NAME, parts, tuple(info.shape), dtype, settings)

    def dequantize(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype, at: Callable[[str], str]
    ) -> torch.Tensor:

        w = dequantize_fp8(parts["weight"], parts["scale"])
        return w if w.dtype == dtype else w.to(dtype)

    def value_range(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], at: Callable[[str], str]
    ) -> tuple[str, float, float]:
        s = float(parts["scale"].float().reshape(()))
        if not s > 0.0:  # NaN and Inf are refused before (checks.STATE_FLOATS)
            raise NumericError(
                f"{at('scale')} is {s:g}; a scale_weight is positive ({'every weight would dequantize to 0' if s == 0 else 'a negative one flips the sign of the weight'})",  # noqa: E501
                hint="the quantized checkpoint is damaged; nothing was written",
            )
        return "scale", s, FP8_MAX[t.settings["fp8_dtype"]]

    def requantize(
        self, t: QuantTensor, merged: torch.Tensor, old: dict[str, torch.Tensor], where: str
    ) -> dict[str, torch.Tensor]:
        if t.settings["fp8_dtype"] != "F8_E4M3":
            raise UnsupportedError(
                f"{where}: --requantize writes float8_e4m3fn scaled weights; this file stores float8_e5m2",
                hint="merge without --requantize (a 16-bit checkpoint)",
            )
        q, scale = quantize(merged, old["scale"])
        return {**old, "weight": q, "scale": scale.to(old["scale"].dtype).reshape(old["scale"].shape)}


#: elements per chunk of :func:`dequantize_fp8` (its int16/fp32 work stays in cache)
CHUNK = 1 << 18


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q.to(float32) * scale`` in float32, bit for bit, at about twice its speed (issue 21 benchmark: torch's
    float8 -> float32 cast is scalar code, 40 s of a 5 GB Flux file's 80 s merge). The fp8 byte is moved into
    float16 bits (e4m3: sign to bit 15, exponent+mantissa shifted 7 up, a value 2^-8 of the code's, subnormals
    included; e5m2 is float16's top byte), widened exactly, and multiplied by ``scale·256`` (or ``scale``): one
    rounding of the same exact product. e4m3's NaN codes (0x7f/0xff) take torch's cast, so a NaN stays a NaN.

    ``out`` (``q``'s shape, any float dtype, e.g. a ring buffer of the merge's row runs): the float32 values
    are rounded into it chunk by chunk, while in cache — the bytes of ``dequantize_fp8(q, s).to(out.dtype)``."""
    import torch

    e4m3 = q.dtype == torch.float8_e4m3fn
    s = scale.to(torch.float32).reshape(())
    if not (e4m3 or q.dtype == torch.float8_e5m2) or not q.numel():
        return _into(q.to(torch.float32) * s, out)
    u = q.reshape(-1).view(torch.uint8)
    res = torch.empty(u.numel(), dtype=torch.float32) if out is None else out.view(-1)
    work = None if out is None or out.dtype == torch.float32 else torch.empty(min(CHUNK, u.numel()))
    factor = s * 256.0 if e4m3 else s
    x, sign = (torch.empty(min(CHUNK, u.numel()), dtype=torch.int16) for _ in range(2))
    for c in range(0, u.numel(), CHUNK):
        k = min(CHUNK, u.numel() - c)
        xs, ys = x[:k], sign[:k]
        xs.copy_(u[c : c + k])
        torch.bitwise_and(xs, 0x80, out=ys).mul_(-256)  # 0x8000 as int16
        xs.bitwise_and_(0x7F).mul_(128 if e4m3 else 256)
        if e4m3 and bool((xs == 0x7F * 128).any()):
            return _into(q.to(torch.float32) * s, out)
        dst = res[c : c + k] if work is None else work[:k]
        dst.copy_(xs.bitwise_or_(ys).view(torch.float16)).mul_(factor)
        if work is not None:
            res[c : c + k].copy_(dst)
    return res.view(q.shape)


def _into(w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return w if out is None else out.copy_(w.view(out.shape))


def pair_table(scale: torch.Tensor, fp8: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """65536 int32: for each pair of fp8 codes (low byte first) the two values of ``dequantize_fp8(codes,
    scale).to(dtype)`` (a 16-bit dtype) side by side — the function is elementwise, so a lookup gives its
    bytes (issue 21 benchmark: 3.6x faster than computing each value on one thread)."""
    import torch

    codes = torch.arange(256, dtype=torch.uint8).view(fp8)
    one = dequantize_fp8(codes, scale).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    pairs = torch.arange(65536, dtype=torch.int32)
    return one[pairs & 0xFF] | (one[pairs >> 8] << 16)


def dequantize_pairs(q: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (16-bit, ``q``'s shape) = ``dequantize_fp8(q, scale).to(out.dtype)`` by :func:`pair_table` lookups,
    chunk by chunk; an odd count or an offset a pair cannot be read at computes as :func:`dequantize_fp8`."""
    import torch

    u, o = q.reshape(-1).view(torch.uint8), out.view(-1)
    if u.numel() % 2 or u.storage_offset() % 2 or o.storage_offset() % 2:
        return dequantize_fp8(q, scale, out=out)
    u16, o32 = u.view(torch.int16), o.view(torch.int32)
    idx = torch.empty(min(CHUNK, u16.numel()), dtype=torch.int32)
    for c in range(0, u16.numel(), CHUNK):
        k = min(CHUNK, u16.numel() - c)
        torch.index_select(table, 0, idx[:k].copy_(u16[c : c + k]).bitwise_and_(0xFFFF), out=o32[c : c + k])
    return out


def quantize(w: torch.Tensor, old_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q float8_e4m3fn, scale float32 ())`` of ``w`` by ComfyUI's ``scale="recalculate"`` rule; an all-zero
    weight keeps ``old_scale`` (the rule's 0 scale would write NaN codes)."""
    import torch

    w = w.to(torch.float32)
    scale = torch.amax(w.abs()).to(torch.float32) / 448.0
    if not float(scale) > 0.0:
        scale = old_scale.to(torch.float32).reshape(()) if old_scale is not None else torch.ones(())
    q = torch.clamp(w * (1.0 / scale), min=-448.0, max=448.0).to(torch.float8_e4m3fn)
    return q, scale


def _marker_type(cp: QuantizedCheckpoint, marker: str) -> str:
    dt = cp.raw_info(marker).dtype
    if dt == "F32":  # ComfyUI: a float32 marker means float8_e4m3fn
        return "F8_E4M3"
    if dt not in FP8:
        raise FormatError(
            f"{cp._at(marker)} is stored as {dt}; the scaled_fp8 marker's dtype names the weights' fp8 type "
            "(F8_E4M3, F8_E5M2, or F32 for F8_E4M3)",
            hint=checks.DAMAGED,
        )
    return dt


def _compute_dtype(cp: QuantizedCheckpoint, keys: set[str]) -> str:
    """The 16-bit dtype of the file's other float tensors (most of them), BF16 if none."""
    seen = Counter(cp.raw_info(k).dtype for k in keys if cp.raw_info(k).dtype in ("BF16", "F16", "F32"))
    if seen.keys() - {"F32"}:  # the scales are F32: a file holding 16-bit tensors is a 16-bit file
        del seen["F32"]
    return seen.most_common(1)[0][0] if seen else "BF16"


SCHEME = ComfyScaledFp8()
