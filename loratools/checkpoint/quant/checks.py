"""Checks on quantized modules: their settings and part shapes against the weight (from the headers, when
the checkpoint is opened), and their values (every time a module is dequantized, and in ``validate``).

Every refusal names the file and the tensor or ``quantization_config`` field, and says what the weight
needs. The value checks are the one finite check of the quantized read: the float parts of a quant state
(code maps, absmax, scales) must be finite and the dequantized weight too (a finite scale can still
overflow), so a merge path never writes NaN, whichever it is (16-bit, ``--requantize``, ``--reference``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, NumericError, UnsupportedError
from loratools.files.safetensors_file import DTYPES

if TYPE_CHECKING:
    import torch

FLOATS = ("F32", "F16", "BF16", "F64")
INTS = ("I32", "I64", "I16", "I8", "U8")
DAMAGED = "the quantized checkpoint is damaged; re-save it with its quantizer (or use the 16-bit base)"
#: tensors of a quant state whose values are read in full by ``check_values`` (small next to the weight)
STATE_FLOATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "SCB", "scale", "scales")


def config_int(qcfg: dict[str, Any], names: tuple[str, ...], default: int, where: str) -> int:
    """An integer ``quantization_config`` setting (the first of ``names`` present), refused when not one."""
    name = next((n for n in names if n in qcfg), names[0])
    value = qcfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{where}: quantization_config.{name} is {value!r}, not an integer", hint=DAMAGED, path=where)
    return value


def block_size(qcfg: dict[str, Any], where: str) -> tuple[int, int] | None:
    """FP8 ``weight_block_size``: two positive integers, or absent/None (per-tensor or from the grid)."""
    block = qcfg.get("weight_block_size")
    if block is None:
        return None
    ok = isinstance(block, list | tuple) and len(block) == 2
    if not ok or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in block):
        raise FormatError(
            f"{where}: quantization_config.weight_block_size is {block!r}; FP8 tiles need two positive integers "
            "(e.g. [128, 128])",
            hint=DAMAGED,
            path=where,
        )
    return int(block[0]), int(block[1])


class Parts:
    """Header facts of one module's raw tensors, for the layout checks: ``at(role)`` names the tensor."""

    def __init__(self, parts: dict[str, str], info: Callable[[str], Any], file_of: Callable[[str], str]) -> None:
        self.parts, self._info, self._file_of = parts, info, file_of

    def at(self, role: str) -> str:
        return f"{self._file_of(self.parts[role])}: {self.parts[role]}"

    def info(self, role: str) -> Any:
        return self._info(self.parts[role])

    def refuse(self, role: str, problem: str) -> None:
        raise FormatError(f"{self.at(role)} {problem}", hint=DAMAGED, path=self._file_of(self.parts[role]))

    def want(self, role: str, dtypes: tuple[str, ...], numel: int | None = None, shape: tuple | None = None) -> None:
        """Part ``role`` is stored as one of ``dtypes`` with ``numel`` values / of ``shape``, or refused."""
        i = self.info(role)
        if i.dtype not in dtypes:
            self.refuse(role, f"is stored as {i.dtype}; a {_role_name(role)} is {' or '.join(dtypes)}")
        if shape is not None and tuple(i.shape) != tuple(shape):
            self.refuse(role, f"has shape {list(i.shape)}; the weight needs {list(shape)}")
        if numel is not None and math.prod(i.shape) != numel:
            self.refuse(role, f"has {math.prod(i.shape)} values; the weight needs {numel}")


def _role_name(role: str) -> str:
    return {"weight": "packed weight", "qweight": "packed weight"}.get(role, role)


def check_bnb4(p: Parts, state: Any, quant_storage: str) -> None:
    """A 4-bit module: packed bytes, absmax, code map and (double quantization) nested parts fit its state."""
    n = math.prod(state.shape)
    w = p.info("weight")
    if w.dtype != quant_storage:
        p.refuse("weight", f"is stored as {w.dtype}; the config's bnb_4bit_quant_storage says {quant_storage}")
    need = (n + 1) // 2  # two codes per byte (a wider quant storage rounds up to whole elements)
    if not need <= w.nbytes < need + DTYPES[w.dtype][1]:
        p.refuse("weight", f"holds {w.nbytes} bytes; {n} 4-bit values of shape {list(state.shape)} need {need}")
    blocks = -(-n // state.blocksize)
    p.want("quant_map", FLOATS, numel=16)
    if state.nested:
        p.want("absmax", ("U8",), numel=blocks)
        p.want("nested_absmax", FLOATS, numel=-(-blocks // state.nested_blocksize))
        p.want("nested_quant_map", FLOATS, numel=256)
    else:
        p.want("absmax", FLOATS, numel=blocks)


def check_bnb8(p: Parts) -> tuple[int, ...]:
    """An LLM.int8 module: a 2-D int8 weight and one float SCB per row; returns the weight's shape."""
    w = p.info("weight")
    if len(w.shape) != 2:
        p.refuse("weight", f"has shape {list(w.shape)}; an 8-bit linear weight is 2-D")
    p.want("SCB", FLOATS, numel=w.shape[0])
    return tuple(w.shape)


def check_fp8(p: Parts, block: tuple[int, int] | None) -> tuple[int, int] | None:
    """An FP8 module: one scale, or a 2-D grid of them tiling the 2-D weight; returns the tile (or None)."""
    from loratools.checkpoint.quant.fp8 import grid

    w, s = p.info("weight"), p.info("scale")
    p.want("scale", FLOATS)
    if math.prod(s.shape) == 1:
        return None
    if len(w.shape) == len(s.shape) == 3:  # fused experts (E, out, in): one 2-D grid per expert
        if s.shape[0] != w.shape[0]:
            p.refuse("scale", f"has {s.shape[0]} expert grids for a weight of {w.shape[0]} experts")
        w, s = _Shape(tuple(w.shape[1:])), _Shape(tuple(s.shape[1:]))
    elif len(w.shape) != 2 or len(s.shape) != 2:
        p.refuse("scale", f"has shape {list(s.shape)} for a weight of shape {list(w.shape)}; block scales "
                 "are a 2-D grid over a 2-D weight")  # fmt: skip
    if block is None:  # no weight_block_size: the tile follows from the grid (exact division only)
        if any(s.shape[i] == 0 or w.shape[i] % s.shape[i] for i in (0, 1)):
            p.refuse("scale", f"grid {list(s.shape)} does not divide the weight {list(w.shape)}")
        return w.shape[0] // s.shape[0], w.shape[1] // s.shape[1]
    want = grid(tuple(w.shape), block)
    if tuple(s.shape) != want:
        p.refuse("scale", f"grid is {list(s.shape)}; weight {list(w.shape)} in {list(block)} tiles needs {list(want)}")
    return block


class _Shape:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def check_int_packed(p: Parts, scheme: str, bits: int, group: int) -> tuple[int, int]:
    """GPTQ / AWQ parts against each other; returns the logical (out, in) shape."""
    q = p.info("qweight")
    p.want("qweight", ("I32",))
    if len(q.shape) != 2:
        p.refuse("qweight", f"has shape {list(q.shape)}; packed {scheme.upper()} weights are 2-D int32")
    per_word = 32 // bits
    n_in, n_out = (q.shape[0] * per_word, q.shape[1]) if scheme == "gptq" else (q.shape[0], q.shape[1] * per_word)
    groups = 1 if group == -1 else -(-n_in // group)
    p.want("scales", FLOATS, shape=(groups, n_out))
    p.want("qzeros", ("I32",), shape=(groups, -(-n_out // per_word)))
    if "g_idx" in p.parts:
        p.want("g_idx", INTS, numel=n_in)
    return n_out, n_in


def check_bits(bits: int, group: int, scheme: str, where: str) -> None:
    supported = (2, 4, 8) if scheme == "gptq" else (4,)
    if bits not in supported:
        raise UnsupportedError(
            f"{where}: quantization_config.bits is {bits}; loratools reads {scheme.upper()} weights of "
            f"{', '.join(map(str, supported))} bits",
            hint="dequantize the base with its own library and merge into the 16-bit copy",
            path=where,
        )
    if group != -1 and group <= 0:
        raise FormatError(
            f"{where}: quantization_config.group_size is {group}; it is a positive number of input rows "
            "(or -1: one group)",
            hint=DAMAGED,
            path=where,
        )


# -- values -----------------------------------------------------------------------------------------
def check_values(t: Any, parts: dict[str, torch.Tensor], at: Callable[[str], str]) -> None:
    """The quant state's own values: float parts finite, GPTQ ``g_idx`` inside its groups.

    ``at(role)`` names a part (file and tensor). The packed weight is not read here.
    """
    from loratools.model.finite import first_nonfinite

    for role in STATE_FLOATS:
        x = parts.get(role)
        first = first_nonfinite(x) if x is not None else None
        if first is not None:
            x = x if x.element_size() > 1 else x.float()
            raise NumericError(
                f"{at(role)} holds NaN/Inf (first at index {first}: {float(x[tuple(first)])}); dequantizing "
                f"{t.key} would write it",
                hint="the quantized checkpoint is damaged; nothing was written",
            )
    _check_signs(t, parts, at)
    _check_range(t, parts, at)
    g = parts.get("g_idx")
    if g is not None and g.numel() and "scales" in parts:
        lo, hi, groups = int(g.min()), int(g.max()), parts["scales"].shape[0]
        if lo < 0 or hi >= groups:
            raise FormatError(
                f"{at('g_idx')} points at group {lo if lo < 0 else hi}; scales has {groups} groups", hint=DAMAGED
            )


#: scale parts no quantizer writes negative (absmax and row maxima; FP8 scale_inv = absmax / 448; GPTQ, AWQ and
#: compressed-tensors' (max - min) / levels; NVFP4's E4M3 group scales): a negative one flips the weight's signs.
#: MLX's affine scales are signed by design (the edge value's sign) and are not here.
UNSIGNED = ("scale", "scales", "SCB", "absmax", "global_scale")


def _check_signs(t: Any, parts: dict[str, torch.Tensor], at: Callable[[str], str]) -> None:
    """No negative scale, and not every scale zero (the weight would dequantize to all zeros)."""
    if t.scheme in ("mlx-affine", "comfy-scaled-fp8"):  # the ComfyUI scheme words its own scale_weight refusal
        return
    for role in UNSIGNED:
        x = parts.get(role)
        if x is None or not x.numel() or not x.is_floating_point():  # U8 E8M0 / nested absmax codes: unsigned
            continue
        x = x if x.element_size() > 1 else x.float()
        if bool((x < 0).any()):
            first = [int(i) for i in (x < 0).nonzero()[0]]
            raise NumericError(
                f"{at(role)} holds a negative scale (first at index {first}: {float(x[tuple(first)])}); "
                f"dequantizing {t.key} would flip its signs",
                hint="the quantized checkpoint is damaged; nothing was written",
            )
        codes = parts.get("weight", parts.get("qweight"))
        if role in ("scale", "scales") and not bool(x.any()) and (codes is None or _nonzero(codes)):
            raise NumericError(
                f"{at(role)} is all zeros; every value of {t.key} would dequantize to 0",
                hint="the quantized checkpoint is damaged; nothing was written",
            )


def _nonzero(codes: torch.Tensor) -> bool:
    import torch

    return bool(codes.contiguous().reshape(-1).view(torch.uint8).any())


def _check_range(t: Any, parts: dict[str, torch.Tensor], at: Callable[[str], str]) -> None:
    """Finite scales whose largest code would overflow the weight's dtype (FP8's 448 × a scale of 1e38)."""
    import torch

    from loratools.files.safetensors_file import torch_dtype

    def top(role: str) -> float:
        return float(parts[role].float().abs().max()) if parts[role].numel() else 0.0

    from loratools.checkpoint.quant.scheme import by_name

    plugin = by_name(t.scheme)
    if plugin is not None:
        role, scale, code = plugin.value_range(t, parts, at)
        dtype = torch_dtype(t.dtype)
    elif t.scheme == "bnb-4bit":
        role, dtype, scale, code = "absmax", torch_dtype(t.dtype), 0.0, top("quant_map")
        if "nested_absmax" in parts and "state" in parts:
            from loratools.checkpoint.quant.bnb import parse_state

            offset = abs(parse_state(parts["state"], at("state")).nested_offset or 0.0)
            role, scale = "nested_absmax", top("nested_quant_map") * top("nested_absmax") + offset
        elif parts["absmax"].is_floating_point():
            scale = top("absmax")
    elif t.scheme == "bnb-8bit":
        role, dtype, scale, code = "SCB", torch_dtype(t.dtype), top("SCB"), 1.0
    elif t.scheme == "fp8":
        role, dtype, scale = "scale", torch_dtype(t.dtype), top("scale")
        code = 57344.0 if t.settings.get("fp8_dtype") == "F8_E5M2" else 448.0
    else:
        role, dtype, scale, code = "scales", torch_dtype(t.dtype), top("scales"), float(2 ** t.settings["bits"])
    limit = torch.finfo(dtype).max
    if scale * code > limit:
        raise NumericError(
            f"{at(role)} holds scales up to {scale:.3g}: its codes (up to {code:g}) dequantize beyond "
            f"{str(dtype).removeprefix('torch.')}'s range ({limit:.3g})",
            hint="the quantized checkpoint is damaged; nothing was written",
        )


def check_dequantized(w: torch.Tensor, where: str, first_row: int = 0) -> torch.Tensor:
    """The one finite check on a dequantized weight (its state's parts were checked before): a finite code
    times a finite scale can still overflow, and FP8 has NaN codes. One cheap sum, a full look on failure.
    ``where`` names the file and the packed weight; ``first_row``: the row of the weight ``w`` starts at."""
    import torch

    from loratools.model.finite import first_nonfinite

    if bool(torch.isfinite(w.sum(dtype=torch.float32))):
        return w
    first = first_nonfinite(w)
    if first is None:
        return w
    first[0] += first_row
    dtype = str(w.dtype).removeprefix("torch.")
    raise NumericError(
        f"{where} dequantizes to NaN/Inf in {dtype} (first at index {first}): its stored codes or scales are "
        "out of range",
        hint="the quantized checkpoint is damaged; nothing was written",
    )
