"""Checks of the ``adapter_config.json`` values that decide what PEFT builds, before any tensor is read.

Types first (``target_modules: 5`` is a config error, not an internal one), then the ranges of the values
that cost time or decide the maths: OFT's ``num_cayley_neumann_terms`` (one b×b product per term and
block), ``r``/``oft_block_size``, BOFT's ``boft_block_size``/``boft_block_num``/``boft_n_butterfly_factor``.
The rules that need the tensors (the block size PEFT would derive, the butterfly factor a block count
allows) are :func:`oft_block_problem` and :func:`boft_problem`; they follow peft/tuners/{oft,boft}/layer.py
``update_layer`` (PEFT 0.21), including OFT's ``adjust_oft_parameters`` for sizes that do not divide.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from loratools.errors import FormatError, ValidationError
from loratools.families.oft import MAX_NEUMANN_TERMS
from loratools.model.finite import finite_number

#: config keys naming modules: a regex string or a list of names (``feedforward_modules`` a subset of targets)
MODULE_LISTS = ("target_modules", "feedforward_modules", "modules_to_save", "exclude_modules")
#: config flags PEFT reads as booleans
FLAGS = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "use_qalora")
#: PEFT type -> integer fields and their (lowest, highest) allowed values
INTEGERS: dict[str, dict[str, tuple[int, int]]] = {
    "OFT": {"r": (0, 2**31), "oft_block_size": (0, 2**31), "num_cayley_neumann_terms": (0, MAX_NEUMANN_TERMS)},
    "BOFT": {"boft_block_size": (0, 2**31), "boft_block_num": (0, 2**31), "boft_n_butterfly_factor": (1, 64)},
    "LOHA": {"r": (1, 2**31)},
    "LOKR": {"r": (1, 2**31)},
}


def _bad(cfg_path: Path, key: str, value: Any, want: str) -> FormatError:
    return FormatError(
        f"{cfg_path}: {key} is {json_repr(value)}; expected {want}",
        hint="fix the value or re-save the adapter with PEFT",
        path=cfg_path,
    )


def json_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_config(cfg: dict[str, Any], peft_type: str, cfg_path: Path) -> None:
    """FormatError naming ``cfg_path`` and the field for a value of the wrong type or out of range; a warning
    for a config without ``peft_type`` (read as LoRA; PEFT's ``PeftModel.from_pretrained`` needs the field)."""
    if "peft_type" not in cfg:
        import warnings

        from loratools.errors import LoratoolsWarning

        warnings.warn(
            f"{cfg_path}: no peft_type, read as a LoRA config (PeftModel.from_pretrained refuses a config "
            "without it; convert --to peft writes one)",
            LoratoolsWarning,
            stacklevel=3,
        )
    for key in MODULE_LISTS:
        value = cfg.get(key)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(cfg_path, key, value, "a regex string or a list of module names")
    for key, (low, high) in INTEGERS.get(peft_type, {}).items():
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _bad(cfg_path, key, value, f"an integer from {low} to {high}")
    for key in FLAGS:  # PEFT tests them for truth: "no" would switch rsLoRA / DoRA / the transpose on
        value = cfg.get(key)
        if value is not None and not isinstance(value, bool):
            raise _bad(cfg_path, key, value, "true or false")
    if peft_type == "LORA":  # PEFT's update_layer refuses r <= 0, for r and every rank_pattern value alike
        pattern = cfg.get("rank_pattern") if isinstance(cfg.get("rank_pattern"), dict) else {}
        for key, value in [("r", cfg.get("r"))] + [(f"rank_pattern[{k!r}]", v) for k, v in pattern.items()]:
            if finite_number(value) and (value < 1 or value != int(value)):
                raise FormatError(f"{cfg_path}: {key} must be a positive integer, got {value!r}", path=cfg_path)
    for key in ("r", "lora_alpha") if peft_type == "LORA" else ():  # PEFT computes lora_alpha / r: null fails
        if key in cfg and cfg[key] is None:
            raise _bad(cfg_path, key, None, "a number (leave the key out for PEFT's default, 8)")
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, dict) or not all(finite_number(v) for v in value.values())):
            raise _bad(cfg_path, key, value, "an object of regex -> finite number")
        for p in value or ():  # PEFT matches rf"(.*\.)?({p})$": a broken regex fails there, named here
            _regex(cfg_path, key, p, rf"(.*\.)?({p})$")
    for key in MODULE_LISTS:
        if isinstance(cfg.get(key), str):
            _regex(cfg_path, key, cfg[key], cfg[key])
    if peft_type in ("LOHA", "LOKR"):
        alpha = cfg.get("alpha")
        if alpha is not None and not finite_number(alpha):
            raise _bad(cfg_path, "alpha", alpha, "a finite number")
    if peft_type == "OFT":
        eps = cfg.get("eps")
        if eps is not None and (not finite_number(eps) or eps < 0):
            raise _bad(cfg_path, "eps", eps, "a finite number >= 0")
        r, size = int(cfg.get("r") or 0), int(cfg.get("oft_block_size") or 0)
        if (r == 0) == (size == 0):
            raise _bad(cfg_path, "r and oft_block_size", [r, size], "exactly one of them non-zero (PEFT's rule)")
    if peft_type == "BOFT":
        size, num = int(cfg.get("boft_block_size") or 0), int(cfg.get("boft_block_num") or 0)
        if (size == 0) == (num == 0):
            raise _bad(cfg_path, "boft_block_size and boft_block_num", [size, num], "exactly one of them non-zero")


def _regex(cfg_path: Path, key: str, pattern: str, full: str) -> None:
    try:
        re.compile(full)
    except re.error as exc:
        raise _bad(cfg_path, key, pattern, f"a valid regex ({exc})") from None


def _adjust(in_features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``in_features`` nearest ``value`` (ties: the lower)."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def oft_block_problem(cfg: dict[str, Any], blocks: int, block_size: int) -> str | None:
    """Why ``blocks`` packed blocks of ``block_size`` are not what PEFT builds from this config (or None)."""
    in_features = blocks * block_size
    r, size = int(cfg.get("r") or 0), int(cfg.get("oft_block_size") or 0)
    if size:
        want = size if in_features % size == 0 and size <= in_features else _adjust(in_features, size)
        if want != block_size:
            return (
                f"adapter_config.json declares oft_block_size {size} (PEFT builds blocks of {want} for "
                f"{in_features} inputs) but oft_R holds blocks of {block_size}"
            )
    elif r:
        want = r if in_features % r == 0 and r <= in_features else _adjust(in_features, r)
        if want != blocks:
            return f"adapter_config.json declares r={r} blocks (PEFT builds {want}) but oft_R holds {blocks}"
    return None


def boft_problem(cfg: dict[str, Any], blocks: int, block_size: int) -> str | None:
    """Why ``boft_R`` (…, ``blocks``, ``block_size``, …) does not fit this BOFT config (or None)."""
    size, num = int(cfg.get("boft_block_size") or 0), int(cfg.get("boft_block_num") or 0)
    if size and size != block_size:
        return f"adapter_config.json declares boft_block_size {size} but boft_R holds blocks of {block_size}"
    if num and num != blocks:
        return f"adapter_config.json declares boft_block_num {num} but boft_R holds {blocks} blocks"
    factor = int(cfg.get("boft_n_butterfly_factor") or 1)
    if factor - 1 > int(math.log2(blocks)):
        return (
            f"adapter_config.json declares boft_n_butterfly_factor {factor}, more than {blocks} blocks allow "
            f"(at most {int(math.log2(blocks)) + 1})"
        )
    return None


def float_tensor(weights_file: Path, key: str, tensor: Any) -> Any:
    """A saved full tensor (modules_to_save, a saved base layer) as read, refused when it is not floating point:
    an int32 copy of lm_head would be merged into the base as integers."""
    if not tensor.is_floating_point():
        raise ValidationError(
            f"{weights_file}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}; a saved module's weights "
            "must be floating point",
            path=weights_file,
        )
    return tensor
