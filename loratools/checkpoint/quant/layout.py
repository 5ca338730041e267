"""Which tensors of a quantized checkpoint belong together, and the logical weights they make.

A :class:`QuantizedCheckpoint` is built from ``quantization_config`` in config.json and the raw tensor
names. Each quantized module becomes one logical ``<module>.weight`` in the base's compute dtype;
its companion tensors (``absmax``, ``SCB``, ``weight_scale_inv``, ``qzeros`` ...) are hidden from the
reader's key list. Everything else (norms, embeddings, an unquantized lm_head) passes through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loratools.checkpoint.quant import checks
from loratools.errors import FormatError, UnsupportedError
from loratools.files.safetensors_file import DTYPES

if TYPE_CHECKING:
    import torch

SCHEMES = ("bnb-4bit", "bnb-8bit", "fp8", "gptq", "awq")
_FLOAT_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_BNB4_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclass(frozen=True)
class LogicalInfo:
    """Header-like info of a dequantized weight (no byte range: it has to be computed)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scheme: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]

    @property
    def is_float(self) -> bool:
        return True


@dataclass
class QuantTensor:
    """One quantized module: its logical weight key, scheme, raw parts by role and settings."""

    key: str
    scheme: str
    parts: dict[str, str]
    shape: tuple[int, ...]
    dtype: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def main_role(self) -> str:
        """The role of the packed weight (the part a message about the whole module names)."""
        return next((r for r in ("weight", "qweight", "blocks", "packed") if r in self.parts), next(iter(self.parts)))


def _dtype_name(value: object, default: str = "BF16") -> str:
    return _FLOAT_NAMES.get(str(value).removeprefix("torch."), default)


def scheme_of(qcfg: dict[str, Any], config: dict[str, Any] | None = None) -> str | None:
    """``bnb-4bit``/``bnb-8bit``/``fp8``/``gptq``/``awq`` (or a scheme module's name, see :mod:`.scheme`)
    from a ``quantization_config`` (and the rest of config.json), or None."""
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "bitsandbytes" or "load_in_4bit" in qcfg or "load_in_8bit" in qcfg:
        if qcfg.get("load_in_4bit") or qcfg.get("_load_in_4bit"):
            return "bnb-4bit"
        if qcfg.get("load_in_8bit") or qcfg.get("_load_in_8bit"):
            return "bnb-8bit"
        return None
    if method in ("fp8", "fbgemm_fp8"):
        return "fp8"
    if method == "gptq":
        return "gptq"
    if method == "awq":
        return "awq"
    from loratools.checkpoint.quant.scheme import detect

    return detect(qcfg, config or {})


class QuantizedCheckpoint:
    """The quantized modules of a checkpoint; ``get`` dequantizes one of them.

    ``raw_info(key)`` and ``raw_get(key)`` read the tensors as stored (given by the reader).
    """

    def __init__(
        self,
        qcfg: dict[str, Any],
        config: dict[str, Any],
        raw_keys: list[str],
        raw_info: Callable[[str], Any],
        raw_get: Callable[[str], torch.Tensor],
        where: str,
        file_of: Callable[[str], str] | None = None,
    ) -> None:
        scheme = scheme_of(qcfg, config)
        if scheme is None:
            raise UnsupportedError(
                f"{where}: quantization_config method {qcfg.get('quant_method')!r} is not one loratools reads",
                hint="supported: bitsandbytes 4/8-bit, fp8, gptq, awq, mxfp4, compressed-tensors int/nvfp4, MLX "
                "affine; dequantize other bases with their own library",
            )
        self.scheme = scheme
        self.qcfg = qcfg
        self.config_full = config
        self.where = where
        self.raw_info = raw_info
        self.raw_get = raw_get
        self.file_of = file_of or (lambda key: where)
        self.config_at = f"{where}/config.json"
        self.compute_dtype = _dtype_name(config.get("dtype") or config.get("torch_dtype"), "BF16")
        self.tensors: dict[str, QuantTensor] = {}
        keys = set(raw_keys)
        find = {"bnb-4bit": self._bnb4, "bnb-8bit": self._bnb8, "fp8": self._fp8, "gptq": self._gptq, "awq": self._awq}
        if scheme in find:
            find[scheme](keys)
        else:
            from loratools.checkpoint.quant.scheme import by_name

            by_name(scheme).discover(self, keys)  # type: ignore[union-attr]
        self.hidden = {p for t in self.tensors.values() for p in t.parts.values()} - set(self.tensors)

    # -- discovery per scheme ---------------------------------------------------------------------
    def _bnb4(self, keys: set[str]) -> None:
        from loratools.checkpoint.quant.bnb import STATE_PREFIX, parse_state

        storage = str(self.qcfg.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
        storage = {"uint8": "U8", "int8": "I8", **_FLOAT_NAMES}.get(storage, storage)
        for k in sorted(keys):
            base, sep, qt = k.partition("." + STATE_PREFIX)
            if not sep or qt not in ("nf4", "fp4") or base not in keys:
                continue
            state = parse_state(self.raw_get(k), self._at(k))
            if state.quant_type != qt:
                raise FormatError(f"{self._at(k)}: quant state field quant_type is {state.quant_type!r}, the tensor's "
                                  f"name says {qt}", hint=checks.DAMAGED)  # fmt: skip
            parts = {"weight": base, "state": k}
            parts.update({p: f"{base}.{p}" for p in _BNB4_PARTS if f"{base}.{p}" in keys})
            needed = ("absmax", "quant_map", *(("nested_absmax", "nested_quant_map") if state.nested else ()))
            missing = [p for p in needed if p not in parts]
            if missing:
                raise FormatError(f"{self._at(base)} has no {base}.{missing[0]} (part of its bitsandbytes quant state)",
                                  hint=checks.DAMAGED)  # fmt: skip
            checks.check_bnb4(self._parts(parts), state, storage)
            settings = {"quant_type": state.quant_type, "blocksize": state.blocksize, "nested": state.nested}
            if state.nested:
                settings["nested_blocksize"] = state.nested_blocksize
            self.tensors[base] = QuantTensor(base, "bnb-4bit", parts, state.shape, _dtype_name(state.dtype), settings)

    def _bnb8(self, keys: set[str]) -> None:
        for k in sorted(keys):
            if not k.endswith(".SCB"):
                continue
            module = k[: -len(".SCB")]
            wkey = f"{module}.weight"
            if wkey not in keys:
                continue
            if self.raw_info(wkey).dtype != "I8":
                raise FormatError(f"{self._at(wkey)} is stored as {self.raw_info(wkey).dtype}; beside its SCB an 8-bit "
                                  "weight is I8", hint=checks.DAMAGED)  # fmt: skip
            parts = {"weight": wkey, "SCB": k}
            if f"{wkey}_format" in keys:
                parts["format"] = f"{wkey}_format"
            shape = checks.check_bnb8(self._parts(parts))
            self.tensors[wkey] = QuantTensor(wkey, "bnb-8bit", parts, shape, self.compute_dtype)

    def _fp8(self, keys: set[str]) -> None:
        block_t = checks.block_size(self.qcfg, self.config_at)
        for k in sorted(keys):
            w = k.removesuffix("_scale_inv")
            if w != k and w in keys and self.raw_info(w).dtype not in ("F8_E4M3", "F8_E5M2"):
                raise FormatError(f"{self._at(w)} is stored as {self.raw_info(w).dtype}; beside its {k} an FP8 weight "
                                  "is F8_E4M3 or F8_E5M2", hint=checks.DAMAGED)  # fmt: skip
        for k in sorted(keys):
            # 3-D experts: gate_up_proj_scale_inv; an FP8 one without it is refused below, not read as plain bytes
            fused = not k.endswith(".weight") and not k.endswith(("_scale_inv", "_scale"))
            if not (k.endswith(".weight") or fused) or self.raw_info(k).dtype not in ("F8_E4M3", "F8_E5M2"):
                continue
            stem = k[: -len(".weight")]
            scale = next((s for s in (f"{k}_scale_inv", f"{k}_scale") if s in keys), None)
            if scale is None:
                raise FormatError(f"{self._at(k)}: FP8 weight has no {k}_scale_inv or {k}_scale beside it")
            parts = {"weight": k, "scale": scale}
            for extra in ("input_scale", "activation_scale"):
                if f"{stem}.{extra}" in keys:
                    parts[extra] = f"{stem}.{extra}"
            settings = {
                "block": checks.check_fp8(self._parts(parts), block_t),
                "scale_name": scale.rsplit(".", 1)[1],
                "ue8m0": self.qcfg.get("scale_fmt") == "ue8m0",
                "fp8_dtype": self.raw_info(k).dtype,
            }
            info = self.raw_info(k)
            self.tensors[k] = QuantTensor(k, "fp8", parts, tuple(info.shape), self.compute_dtype, settings)

    def _int_packed(self, keys: set[str], scheme: str) -> None:
        bits = checks.config_int(self.qcfg, ("bits", "w_bit"), 4, self.config_at)
        group = checks.config_int(self.qcfg, ("group_size", "q_group_size"), 128, self.config_at)
        checks.check_bits(bits, group, scheme, self.config_at)
        for k in sorted(keys):
            if not k.endswith(".qweight"):
                continue
            module = k[: -len(".qweight")]
            parts = {"qweight": k}
            for role in ("qzeros", "scales", "g_idx"):
                if f"{module}.{role}" in keys:
                    parts[role] = f"{module}.{role}"
            if "qzeros" not in parts or "scales" not in parts:
                raise FormatError(f"{self._at(k)} has no qzeros/scales beside it", hint=checks.DAMAGED)
            sinfo = self.raw_info(parts["scales"])
            shape = checks.check_int_packed(self._parts(parts), scheme, bits, group)
            if scheme == "gptq":
                fmt = str(self.qcfg.get("checkpoint_format", "gptq")).lower()
                settings = {
                    "bits": bits,
                    "group_size": group,
                    "v1": fmt != "gptq_v2",
                    "desc_act": bool(self.qcfg.get("desc_act")),
                }
            else:
                version = str(self.qcfg.get("version", "gemm")).lower()
                if version != "gemm":
                    raise UnsupportedError(
                        f"{self.where}: AWQ version {version!r} is not supported (GEMM is)",
                        hint="dequantize the base with autoawq and merge into the 16-bit copy",
                    )
                settings = {"bits": bits, "group_size": group}
            dtype = sinfo.dtype if sinfo.dtype in ("F16", "BF16", "F32") else "F16"
            self.tensors[f"{module}.weight"] = QuantTensor(f"{module}.weight", scheme, parts, shape, dtype, settings)

    def _gptq(self, keys: set[str]) -> None:
        self._int_packed(keys, "gptq")

    def _awq(self, keys: set[str]) -> None:
        self._int_packed(keys, "awq")

    def _at(self, raw_key: str) -> str:
        """The file and raw tensor a message names."""
        return f"{self.file_of(raw_key)}: {raw_key}"

    def _parts(self, parts: dict[str, str]) -> checks.Parts:
        return checks.Parts(parts, self.raw_info, self.file_of)

    # -- reading ---------------------------------------------------------------------------------
    def info(self, key: str) -> LogicalInfo:
        t = self.tensors[key]
        return LogicalInfo(key, t.dtype, t.shape, t.scheme)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight in the compute dtype (``dtype=torch.float32`` skips the final cast)."""
        from loratools.files.safetensors_file import torch_dtype

        t = self.tensors[key]
        out = torch_dtype(t.dtype) if dtype is None else dtype
        return dequantize(t, self.read_parts(t), out, self.part_namer(t))

    def read_parts(self, t: QuantTensor, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Module ``t``'s raw parts by role, as stored (``skip``: roles not read)."""
        return {role: self.raw_get(k) for role, k in t.parts.items() if role not in skip}

    def part_namer(self, t: QuantTensor) -> Callable[[str], str]:
        """``role -> "file: tensor"`` for the messages about module ``t``."""
        return lambda role: self._at(t.parts[role])

    def logical_weight_map(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` (key -> file) with the companion tensors hidden and each logical weight in its place."""
        placed = {t.parts[t.main_role]: t.key for t in self.tensors.values()}
        out: dict[str, Any] = {}
        for k, f in raw.items():
            if k in placed:
                out[placed[k]] = f
            elif k not in self.hidden:
                out[k] = f
        return out

    def summary(self) -> dict[str, Any]:
        """Scheme, bits, block sizes and the quantized tensors (for info/validate)."""
        names = sorted(self.tensors)
        first = self.tensors[names[0]]
        from loratools.checkpoint.quant.scheme import by_name

        plugin = by_name(self.scheme)
        bits = plugin.bits(first) if plugin else {"bnb-4bit": 4, "bnb-8bit": 8, "fp8": 8}.get(self.scheme)
        bits = first.settings.get("bits") if bits is None else bits
        settings = {k: v for k, v in first.settings.items() if k not in ("scale_name",)}
        return {
            "scheme": self.scheme,
            "bits": bits,
            "settings": settings,
            "compute_dtype": {v: k for k, v in _FLOAT_NAMES.items()}[first.dtype],
            "quantized_tensors": len(names),
            "quantized": names,
        }


def dequantize(
    t: QuantTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype, at: Callable[[str], str]
) -> torch.Tensor:
    """A module's weight from its raw parts, cast once to ``dtype``; ``at(role)`` names a part in messages.

    Every path that dequantizes (16-bit merge, ``--requantize``, ``--reference``, validate) comes here:
    the state's values are checked first and the result once (:mod:`.checks`), so no NaN gets out.
    """
    checks.check_values(t, parts, at)
    w = _dequantize(t, parts, dtype, at)
    return checks.check_dequantized(w, at(t.main_role))


def _dequantize(t: QuantTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype, at: Callable[[str], str]):  # noqa: ANN202
    from loratools.checkpoint.quant import bnb, fp8, gptq
    from loratools.checkpoint.quant.scheme import by_name

    plugin = by_name(t.scheme)
    if plugin is not None:
        w = plugin.dequantize(t, parts, dtype, at)
        return w if w.dtype == dtype else w.to(dtype)
    where = at("weight" if "weight" in t.parts else "qweight")
    if t.scheme == "bnb-4bit":
        state = bnb.parse_state(parts["state"], at("state"))
        absmax = parts["absmax"]
        if state.nested:
            absmax = bnb.nested_absmax(state, absmax, parts["nested_absmax"], parts["nested_quant_map"])
        w = bnb.dequantize_4bit(parts["weight"], absmax, parts["quant_map"], state)  # bitsandbytes' own rounding
        return w if w.dtype == dtype else w.to(dtype)
    if t.scheme == "bnb-8bit":
        return bnb.dequantize_int8(parts["weight"], parts["SCB"]).to(dtype)
    if t.scheme == "fp8":
        return fp8.dequantize(parts["weight"], parts["scale"], t.settings["block"], dtype, where)
    s = t.settings
    if t.scheme == "gptq":
        w = gptq.dequantize_gptq(
            parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"),
            bits=s["bits"], group_size=s["group_size"], v1=s["v1"], where=where,
        )  # fmt: skip
    else:
        w = gptq.dequantize_awq(
            parts["qweight"], parts["qzeros"], parts["scales"], bits=s["bits"], group_size=s["group_size"], where=where
        )
    return w if w.dtype == dtype else w.to(dtype)
