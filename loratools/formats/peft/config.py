"""The ``adapter_config.json`` that makes PEFT rebuild exactly an adapter's modules, ranks and scales:
the writing half of the PEFT format (the adapter's own targets when its module set is unchanged, else full
module paths; rank/alpha patterns for what differs from the most common value, rank-0 modules left out)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from loratools.errors import UnsupportedError, ValidationError
from loratools.model.adapter import Adapter, LoraModule
from loratools.model.alora import invocation_tokens


def live_modules(adapter: Adapter) -> dict[str, LoraModule]:
    """The modules with rank > 0: a rank-0 module changes nothing and PEFT cannot build one."""
    return {n: m for n, m in adapter.modules.items() if m.rank > 0}


def config_for(adapter: Adapter) -> dict[str, Any]:
    """An ``adapter_config.json`` that makes PEFT rebuild exactly these modules, ranks and scales."""
    mods = live_modules(adapter)
    if not mods and not adapter.replacements:
        raise ValidationError("the adapter has no modules to write")
    rslora = {m.use_rslora for m in mods.values()}
    if len(rslora) > 1:
        raise UnsupportedError(
            "PEFT cannot hold rsLoRA and plain LoRA modules in one adapter",
            hint="rescale (loratools rescale --alpha) to one convention first",
        )
    use_rslora = rslora.pop() if rslora else False
    refuse_mixed_dora(mods, "PEFT")
    rank_counts = Counter(m.rank for m in mods.values())
    alpha_counts = Counter(float(m.alpha) for m in mods.values())
    r = rank_counts.most_common(1)[0][0] if mods else 8
    alpha = alpha_counts.most_common(1)[0][0] if mods else 8.0
    rank_pattern = {module_pattern(n, mods): m.rank for n, m in mods.items() if m.rank != r}
    alpha_pattern = {module_pattern(n, mods): _num(m.alpha) for n, m in mods.items() if float(m.alpha) != alpha}
    to_save = sorted({k.rpartition(".")[0] for k in adapter.replacements if k.rpartition(".")[0] not in mods})
    old = dict(adapter.meta.get("config") or {}) if adapter.format == "peft" else {}
    kept = kept_targets(adapter, mods)
    targets = kept["target_modules"] if kept else sorted(mods)
    cfg: dict[str, Any] = {**old}
    cfg.update(
        {
            "peft_type": "LORA",
            "base_model_name_or_path": adapter.base_model,
            "r": r,
            "lora_alpha": _num(alpha),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "target_modules": targets,
            "modules_to_save": to_save or None,
            "use_rslora": use_rslora,
            "alora_invocation_tokens": invocation_tokens(adapter),
            "use_dora": any(m.magnitude is not None for m in mods.values()),
            "lora_bias": any(m.bias is not None for m in mods.values()),
            "fan_in_fan_out": any(m.fan_in_fan_out for m in mods.values()),
            "bias": "none",
            "inference_mode": True,
            "init_lora_weights": True,
            "lora_dropout": old.get("lora_dropout", 0.0),
            "task_type": old.get("task_type", adapter.meta.get("task_type")),
        }
    )
    for stale in ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters"):
        cfg.pop(stale, None)
    cfg.update(kept or {})
    return cfg


#: config fields that together say which modules PEFT wraps
TARGET_FIELDS = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")


def module_pattern(name: str, mods: Any) -> str:
    """A rank/alpha pattern that PEFT's ``(.*\\.)?(p)$`` matches to ``name`` only: anchored with ``^`` when ``name``
    ends another module's path (Flux's ``proj_out`` and ``single_transformer_blocks.0.proj_out``), where the bare
    name would give the other module this one's rank or alpha."""
    suffix = any(other != name and other.endswith("." + name) for other in mods)
    return ("^" if suffix else "") + re.escape(name)


def kept_targets(adapter: Adapter, mods: Any) -> dict[str, Any] | None:
    """The adapter's own target fields (``target_modules: [q_proj, v_proj]``) when the modules written are
    exactly those it was read with, else None: the writer then lists full module paths, because PEFT takes a
    list entry as an exact name or dotted suffix, and a leaf name would also wrap same-named modules the file
    holds no tensors for (BERT's three ``dense``). A user's short names survive rescale and resize."""
    cfg = adapter.meta.get("config")
    read_with = adapter.meta.get("config_modules")
    if adapter.format != "peft" or not isinstance(cfg, dict) or not isinstance(read_with, list):
        return None
    if sorted(mods) != read_with or cfg.get("target_modules") in (None, [], ""):
        return None
    return {k: cfg[k] for k in TARGET_FIELDS if cfg.get(k) is not None}


def refuse_mixed_dora(mods: dict[str, LoraModule], where: str) -> None:
    """``use_dora`` is one flag per config: a DoRA module beside plain ones would make PEFT build DoRA for
    all of them, and the plain ones would merge with a magnitude it initialises from ‖W‖ (not W + ΔW)."""
    plain = sorted(n for n, m in mods.items() if m.magnitude is None)
    dora = sorted(n for n, m in mods.items() if m.magnitude is not None)
    if plain and dora:
        raise UnsupportedError(
            f"{where} holds one use_dora for all modules, but {dora[0]} is DoRA and {plain[0]} is not "
            f"({len(dora)} DoRA, {len(plain)} plain): written as one adapter, the plain ones would become DoRA",
            hint="lower the DoRA modules to plain LoRA first: loratools convert ADAPTER --to peft --as-lora --base "
            "BASE -o OUT, or write them apart with --include / --exclude",
        )


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
