"""compressed-tensors checkpoints (``quant_method: compressed-tensors``): int ``pack-quantized`` and NVFP4.

Read from ``quantization_config.config_groups`` (each group: ``targets``, ``weights`` args, ``format``, or the
config's own ``format``); a module's group is the one whose ``re:`` target matches its name, else the one
group with class targets (``Linear``).

- ``pack-quantized`` (int, 2/4/8 bits): ``weight_packed`` int32 (out, in·bits/32), codes + 2^(bits−1) packed
  along the input, lowest bits first; ``weight_shape`` (out, in); ``weight_scale`` (out, in/group) for the
  ``group`` strategy, (out, 1) for ``channel``, (1,) for ``tensor``; asymmetric: ``weight_zero_point`` int32
  packed the same way along the *output* dim, (out·bits/32, groups). W = (q − zp) · scale, rounded once to the
  scale's dtype — the package's ``dequantize``. (3, 5, 6, 7 bits straddle words: refused.)
- ``nvfp4-pack-quantized``: ``weight_packed`` uint8 (out, in/2), E2M1 codes, the even element in the low
  nibble; ``weight_scale`` float8_e4m3fn (out, in/16); ``weight_global_scale`` fp32 (1,). W = code ·
  (scale / global_scale), computed as the package does (scale in bf16 over the fp32 global, fp32 product),
  rounded once to bfloat16, the dtype its decompressor writes.

Both are bit-equal to compressed-tensors' own decompressors (tests/quant/test_compressed.py). ``--requantize``
recomputes scales the package's way (its ``calculate_qparams``: min/max per group; NVFP4's global scale
448·6/max|W|) and rounds to nearest, which is llm-compressor's round-to-nearest scheme, not GPTQ: a
GPTQ-calibrated base loses its calibration in the modules an adapter touches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loratools.checkpoint.quant import checks
from loratools.checkpoint.quant.mxfp4 import E2M1, e2m1_codes, pack_codes, unpack_codes
from loratools.checkpoint.quant.scheme import QuantScheme
from loratools.errors import FormatError, UnsupportedError

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.quant.layout import QuantizedCheckpoint, QuantTensor

FORMATS = {"pack-quantized": "ct-int", "nvfp4-pack-quantized": "nvfp4"}
_HINT = "dequantize it with compressed-tensors (or llm-compressor) and merge into the 16-bit copy"


def _groups(qcfg: dict[str, Any], where: str) -> list[tuple[list[str], dict[str, Any], str]]:
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FormatError(f"{where}: quantization_config.config_groups is {groups!r}; compressed-tensors "
                          "configs name their quantization groups there", hint=checks.DAMAGED, path=where)  # fmt: skip
    out = []
    for name, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise FormatError(f"{where}: quantization_config.config_groups.{name}.weights is {w!r}",
                              hint=checks.DAMAGED, path=where)  # fmt: skip
        targets = g.get("targets") or []
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise FormatError(f"{where}: quantization_config.config_groups.{name}.targets is {targets!r}",
                              hint=checks.DAMAGED, path=where)  # fmt: skip
        out.append((targets, w, str(g.get("format") or qcfg.get("format") or "")))
    return out


def _group_for(module: str, groups: list, where: str) -> tuple[dict[str, Any], str]:
    for targets, w, fmt in groups:
        if any(t.startswith("re:") and re.search(t[3:], module) for t in targets):
            return w, fmt
    plain = [(w, fmt) for targets, w, fmt in groups if any(not t.startswith("re:") for t in targets)]
    if len(plain) == 1:
        return plain[0]
    raise UnsupportedError(f"{where}: no single quantization_config.config_groups entry names {module}",
                           hint="give each group a 're:' target that matches its modules, or " + _HINT)  # fmt: skip


def _int_setting(w: dict[str, Any], name: str, where: str, default: Any = None) -> Any:
    v = w.get(name, default)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise FormatError(f"{where}: quantization_config weights.{name} is {v!r}, not a positive integer",
                          hint=checks.DAMAGED, path=where)  # fmt: skip
    return v


class CompressedTensors(QuantScheme):
    names = ("ct-int", "nvfp4")
    requantizable = ("ct-int", "nvfp4")

    def detect(self, qcfg: dict[str, Any], config: dict[str, Any]) -> str | None:
        if str(qcfg.get("quant_method", "")).lower() != "compressed-tensors":
            return None
        groups = qcfg.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            return "ct-int"  # opening it refuses config_groups with a message naming the field
        fmts = {str(g.get("format") or qcfg.get("format")) for g in groups.values() if isinstance(g, dict)}
        fmts = fmts or {str(qcfg.get("format"))}
        known = {FORMATS.get(f) for f in fmts} - {None}
        if len(known) == 1 and len(fmts) == 1:
            return known.pop()
        return None  # another format (float-quantized, sparse, mixed): refused by merge as "not read"

    def discover(self, cp: QuantizedCheckpoint, keys: set[str]) -> None:
        from loratools.checkpoint.quant.layout import QuantTensor

        groups = _groups(cp.qcfg, cp.config_at)
        for k in sorted(keys):
            if not k.endswith(".weight_packed"):
                continue
            module = k.removesuffix(".weight_packed")
            w, fmt = _group_for(module, groups, cp.config_at)
            scheme = FORMATS.get(fmt)
            if scheme is None:
                raise UnsupportedError(f"{cp.config_at}: {module} is compressed as {fmt!r}; loratools reads "
                                       f"{', '.join(FORMATS)}", hint=_HINT, path=cp.config_at)  # fmt: skip
            if f"{module}.weight_g_idx" in keys:
                raise UnsupportedError(f"{cp._at(k)}: activation-ordered groups (weight_g_idx) are not read",
                                       hint=_HINT)  # fmt: skip
            parts = {"weight": k, "scale": f"{module}.weight_scale"}
            for role, name in (("zero_point", "weight_zero_point"), ("global_scale", "weight_global_scale"),
                               ("shape", "weight_shape")):  # fmt: skip
                if f"{module}.{name}" in keys:
                    parts[role] = f"{module}.{name}"
            if parts["scale"] not in keys:
                raise FormatError(f"{cp._at(k)} has no {module}.weight_scale beside it", hint=checks.DAMAGED)
            settings = self._settings(w, scheme, cp.config_at)
            p = cp._parts(parts)
            shape, dtype = (_check_int if scheme == "ct-int" else _check_nvfp4)(p, settings)
            settings["symmetric"] = "zero_point" not in parts
            sym = w.get("symmetric")
            if sym is not None and not isinstance(sym, bool):
                raise FormatError(f"{cp.config_at}: quantization_config weights.symmetric is {sym!r}, not true/false",
                                  hint=checks.DAMAGED, path=cp.config_at)  # fmt: skip
            if scheme == "ct-int" and sym is False and settings["symmetric"]:  # the tensors contradict the config
                raise FormatError(f"{cp._at(k)} has no {module}.weight_zero_point beside it, and the config says "
                                  "symmetric: false (asymmetric weights need one)", hint=checks.DAMAGED)  # fmt: skip
            cp.tensors[f"{module}.weight"] = QuantTensor(f"{module}.weight", scheme, parts, shape, dtype, settings)

    def _settings(self, w: dict[str, Any], scheme: str, where: str) -> dict[str, Any]:
        bits = _int_setting(w, "num_bits", where, 4)
        strategy = str(w.get("strategy") or "").lower()
        kind = str(w.get("type") or "int").lower()
        group = _int_setting(w, "group_size", where)
        if scheme == "ct-int":
            if kind != "int" or bits not in (2, 4, 8) or strategy not in ("group", "channel", "tensor"):
                raise UnsupportedError(
                    f"{where}: pack-quantized {kind} {bits}-bit {strategy!r} weights are not read (int 2/4/8-bit, "
                    "group/channel/tensor strategies are)",
                    hint=_HINT,
                )
            if strategy == "group" and group is None:
                raise FormatError(f"{where}: the group strategy needs weights.group_size", hint=checks.DAMAGED)
        elif kind != "float" or bits != 4 or group != 16:
            raise UnsupportedError(f"{where}: nvfp4 weights are 4-bit float in groups of 16, the config says "
                                   f"{kind} {bits}-bit, group {group}", hint=_HINT)  # fmt: skip
        return {"bits": bits, "strategy": strategy, "group_size": group}

    def dequantize(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype, at: Callable[[str], str]
    ) -> torch.Tensor:
        if t.scheme == "nvfp4":
            return dequantize_nvfp4(parts["weight"], parts["scale"], parts["global_scale"])
        s = t.settings
        return dequantize_int(parts["weight"], parts["scale"], parts.get("zero_point"), s["bits"], t.shape)

    def value_range(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], at: Callable[[str], str]
    ) -> tuple[str, float, float]:
        scale = float(parts["scale"].float().abs().max()) if parts["scale"].numel() else 0.0
        stated = parts.get("shape")
        if stated is not None and [int(v) for v in stated.reshape(-1)] != list(t.shape):
            raise FormatError(f"{at('shape')} is {[int(v) for v in stated.reshape(-1)]}; the packed weight holds "
                              f"{list(t.shape)}", hint=checks.DAMAGED)  # fmt: skip
        if t.scheme == "nvfp4":
            from loratools.model.finite import first_nonfinite

            g = parts["global_scale"].float()
            if first_nonfinite(g) is not None or bool((g == 0).any()):
                from loratools.errors import NumericError

                raise NumericError(f"{at('global_scale')} is {g.tolist()}: the weight's scales divide by it",
                                   hint="the quantized checkpoint is damaged; nothing was written")  # fmt: skip
            return "scale", scale / float(g.abs().min()), 6.0
        return "scale", scale, float(2 ** t.settings["bits"])

    def requantize(
        self, t: QuantTensor, merged: torch.Tensor, old: dict[str, torch.Tensor], where: str
    ) -> dict[str, torch.Tensor]:
        import torch

        if t.scheme == "nvfp4":  # llm-compressor quantizes the bf16 weight
            new = quantize_nvfp4(merged.to(torch.bfloat16))
        else:
            new = quantize_int(merged.to(old["scale"].dtype), t.settings, "zero_point" in old)
        return {**old, **{k: v.reshape(old[k].shape).to(old[k].dtype) for k, v in new.items()}}


def _check_int(p: checks.Parts, s: dict[str, Any]) -> tuple[tuple[int, int], str]:
    bits, strategy, group = s["bits"], s["strategy"], s["group_size"]
    p.want("weight", ("I32",))
    pk = p.info("weight")
    if len(pk.shape) != 2:
        p.refuse("weight", f"has shape {list(pk.shape)}; packed linear weights are 2-D int32")
    out_f, n_in = pk.shape[0], pk.shape[1] * 32 // bits
    if "shape" in p.parts:
        p.want("shape", checks.INTS, numel=2)
    p.want("scale", checks.FLOATS)
    groups = {"group": -(-n_in // (group or 1)), "channel": 1, "tensor": None}[strategy]
    want = (1,) if groups is None else (out_f, groups)
    sc = p.info("scale")
    if tuple(sc.shape) != want and not (groups is None and math.prod(sc.shape) == 1):
        p.refuse("scale", f"has shape {list(sc.shape)}; a {strategy} scale of this weight is {list(want)}")
    if "zero_point" in p.parts:
        p.want("zero_point", ("I32",), shape=(-(-out_f * bits // 32), groups or 1))
    return (out_f, n_in), sc.dtype if sc.dtype in ("F16", "BF16", "F32") else "BF16"


def _check_nvfp4(p: checks.Parts, s: dict[str, Any]) -> tuple[tuple[int, int], str]:
    p.want("weight", ("U8",))
    pk = p.info("weight")
    if len(pk.shape) != 2:
        p.refuse("weight", f"has shape {list(pk.shape)}; NVFP4 linear weights are 2-D uint8")
    out_f, n_in = pk.shape[0], pk.shape[1] * 2
    if n_in % 16:
        p.refuse("weight", f"unpacks to {n_in} input columns; NVFP4 groups of 16 need a multiple of 16")
    p.want("scale", ("F8_E4M3",), shape=(out_f, n_in // 16))
    if "global_scale" not in p.parts:
        raise FormatError(f"{p.at('weight')} has no weight_global_scale beside it", hint=checks.DAMAGED)
    p.want("global_scale", ("F32",), numel=1)
    return (out_f, n_in), "BF16"


def unpack_int(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 (rows, words) -> signed codes (rows, cols): lowest bits first, minus 2^(bits−1)."""
    import torch

    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))


def dequantize_int(
    packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """(q − zp) · scale per group, exact in fp32 (a small integer times a 16-bit scale), rounded once to the
    scale's dtype — what compressed-tensors computes in that dtype."""
    import torch

    out_f, n_in = shape
    q = unpack_int(packed, bits, n_in).to(torch.float32)
    s = scale.to(torch.float32).reshape(out_f if scale.numel() > 1 else 1, -1)
    groups = s.shape[1]
    if zero_point is not None:
        zp = unpack_int(zero_point.T.contiguous(), bits, out_f).T.to(torch.float32)  # packed along the output
        q = q.reshape(out_f, groups, -1) - zp.reshape(out_f, groups, 1)
    w = q.reshape(out_f, groups, -1) * s.reshape(s.shape[0], groups, 1)
    return w.reshape(out_f, n_in).to(scale.dtype)


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    import torch

    lut = torch.tensor(E2M1, dtype=torch.float32)
    out_f = packed.shape[0]
    q = lut[unpack_codes(packed).to(torch.int64)].reshape(out_f, -1, 16)  # exact in bf16, as theirs is
    s = scale.to(torch.bfloat16) / global_scale  # bf16 over fp32: the package's promotion (fp32)
    return (q.to(s.dtype) * s.unsqueeze(-1)).reshape(out_f, -1).to(torch.bfloat16)


def _minmax(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return torch.clamp(w.amin(-1), max=0), torch.clamp(w.amax(-1), min=0)  # 0 stays representable


def quantize_int(w: torch.Tensor, s: dict[str, Any], asymmetric: bool) -> dict[str, torch.Tensor]:
    """Round-to-nearest int codes with min/max scales, in ``w``'s dtype with the package's operations
    (``calculate_qparams`` then ``quantize``), packed as ``pack_to_int32`` packs them."""
    import torch

    bits, out_f, n_in = s["bits"], w.shape[0], w.shape[1]
    per = {"group": s["group_size"], "channel": n_in, "tensor": n_in * out_f}[s["strategy"]]
    g = w.reshape(-1, per) if s["strategy"] != "tensor" else w.reshape(1, -1)
    lo, hi = _minmax(g)
    qmin, qmax = torch.tensor(-(2.0**bits) / 2), torch.tensor(2.0**bits / 2 - 1)
    if asymmetric:
        scale = (hi - lo) / (qmax - qmin).to(hi.dtype)
        zp = torch.clamp(qmin - lo / scale, qmin, qmax)
    else:
        scale = torch.max(lo.abs(), hi.abs()) / ((qmax - qmin).to(hi.dtype) / 2)
        zp = torch.zeros_like(scale)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    zp = torch.round(torch.clamp(zp, -128, 127)).to(torch.int8)
    x = g / scale.unsqueeze(-1) + zp.to(g.dtype).unsqueeze(-1)
    q = torch.round(torch.clamp(x, qmin, qmax)).to(torch.int8).reshape(out_f, n_in)
    rows = 1 if s["strategy"] == "tensor" else out_f
    new = {"weight": pack_int(q, bits), "scale": scale.reshape(rows, -1)}
    if asymmetric:
        new["zero_point"] = pack_int(zp.reshape(rows, -1).T.contiguous(), bits).T.contiguous()
    return new


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows, cols) -> int32 words along the columns, lowest bits first, + 2^(bits−1)."""
    import torch

    k = 32 // bits
    u = q.to(torch.int64) + (1 << (bits - 1))
    cols = -(-u.shape[1] // k) * k
    u = torch.nn.functional.pad(u, (0, cols - u.shape[1])).reshape(u.shape[0], -1, k)
    words = (u << torch.arange(0, 32, bits, dtype=torch.int64)).sum(-1)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def quantize_nvfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """NVFP4 of a bf16 weight as llm-compressor makes it: global = 448·6 / max|W| (fp32), per-16 scales
    max|group| / 6 · global rounded to float8_e4m3fn, codes = E2M1(W / (scale / global)) to nearest-even."""
    import torch

    lo, hi = _minmax(w.reshape(1, -1).float())
    amax = torch.clamp(torch.max(lo.abs(), hi.abs()), min=torch.finfo(torch.float32).tiny)
    glob = torch.nan_to_num(448.0 * 6.0 / amax, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)
    g = w.reshape(w.shape[0], -1, 16)
    lo, hi = _minmax(g)
    scale = glob * (torch.max(lo.abs(), hi.abs()) / 6.0)  # bf16 max / 6 in bf16, times the fp32 global
    scale = torch.clamp(scale, -448.0, 448.0).to(torch.float8_e4m3fn).to(scale.dtype)
    scale = torch.where(scale == 0, torch.tensor(0.125, dtype=scale.dtype), scale)
    x = torch.clamp(g / (scale / glob).unsqueeze(-1), -6.0, 6.0)
    codes = e2m1_codes(x.float()).reshape(w.shape[0], -1)
    return {"weight": pack_codes(codes), "scale": scale.to(torch.float8_e4m3fn), "global_scale": glob}


__all__ = ["SCHEME", "dequantize_int", "dequantize_nvfp4", "e2m1_codes", "pack_codes", "unpack_int"]

SCHEME = CompressedTensors()
