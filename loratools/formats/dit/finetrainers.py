"""finetrainers' LoRA metadata (huggingface/finetrainers, formerly a-r-r-o-w/finetrainers and cogvideox-factory).

Its trainers (``finetrainers/trainer/sft_trainer/trainer.py``, ``control_trainer/trainer.py``) save the transformer's
PEFT state dict through the pipeline's ``save_lora_weights`` (``models/cogvideox/base_specification.py`` and the
other specifications: diffusers' ``transformer.`` names) with their own save function, whose only safetensors
metadata is ``lora_config``: the JSON of ``{"r", "lora_alpha", "init_lora_weights", "target_modules"}`` (the control
trainer adds ``rank_pattern``/``alpha_pattern``) — not diffusers' ``lora_adapter_metadata``. finetrainers' own
loader (``finetrainers/patches/dependencies/diffusers/peft.py``) builds ``LoraConfig(**lora_config)`` from it, so the
scale is lora_alpha/r; diffusers' ``load_lora_weights`` ignores the key and takes alpha = rank (its defaults,
rank 64 and lora_alpha 64, hide the difference). Read here as the transformer's LoraConfig.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratools.errors import FormatError
from loratools.model.finite import finite_number

KEY = "lora_config"


def _bad(where: Path, what: str) -> FormatError:
    return FormatError(
        f"{where}: {KEY} metadata (finetrainers): {what}",
        hint="the file's metadata is damaged; re-save it with finetrainers, or remove its lora_config metadata "
        "(the file is then read with alpha = rank: merge it with a weight of ALPHA/R for the trained strength)",
        path=where,
    )


def transformer_config(metadata: dict[str, str], where: Path) -> dict[str, dict[str, Any]]:
    """``{"transformer": lora_config}`` for a file finetrainers saved (no ``lora_adapter_metadata``), else ``{}``."""
    raw = metadata.get(KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _bad(where, f"not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _bad(where, "not a JSON object")
    for field in ("r", "lora_alpha"):
        if field in cfg and not (finite_number(cfg[field]) and cfg[field] > 0):
            raise _bad(where, f"{field} must be a positive finite number, got {cfg[field]!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict) or not all(finite_number(v) and v > 0 for v in pattern.values()):
            raise _bad(where, f"{field} must be an object of module pattern -> positive number, got {pattern!r}")
    return {"transformer": cfg}


__all__ = ["KEY", "transformer_config"]
