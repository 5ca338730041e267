"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Keys are ``base_model.model.<module>.lora_A.weight`` (r×in) and ``.lora_B.weight`` (out×r), optional
``.lora_B.bias``; embeddings use ``lora_embedding_A`` (r×num_embeddings) / ``lora_embedding_B``
(dim×r); DoRA adds ``lora_magnitude_vector``; ``modules_to_save`` copies and saved embedding
``base_layer`` weights are full tensors. Scale is ``lora_alpha/r`` (``/√r`` with ``use_rslora``), with
``rank_pattern``/``alpha_pattern`` regexes matched as PEFT's ``get_pattern_key`` does.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, LoraModule
from ..errors import FormatError, UnsupportedError, ValidationError
from ..publish import provenance_metadata, read_provenance
from ..safetensors_file import load_file
from .registry import AdapterFormat, register_format

if TYPE_CHECKING:
    import torch

    from ..checkpoint.reader import CheckpointReader

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
#: suffix -> (role) for LoRA tensors, longest first
_ROLES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "bias"),
    (".lora_embedding_A", "down_emb"),
    (".lora_embedding_B", "up_emb"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
)
_DEFAULTS = {"r": 8, "lora_alpha": 8}


def get_pattern_key(pattern_keys: list[str], key: str) -> str | None:
    """PEFT's rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", key)``, else None."""
    for p in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({p})$", key):
                return p
        except re.error as exc:
            raise FormatError(f"rank/alpha pattern {p!r} is not a valid regex: {exc}") from None
    return None


def _read_config(path: Path) -> dict[str, Any]:
    from ..checkpoint.reader import read_json

    cfg_path = path / CONFIG
    cfg = read_json(cfg_path, CONFIG)
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object", path=cfg_path)
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{cfg_path}: PEFT type {peft_type} is not LoRA; loratools handles LoRA (and DoRA) adapters only",
            path=cfg_path,
        )
    return cfg


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    st = path / WEIGHTS
    if st.is_file():
        tensors, meta = load_file(st)
        return tensors, meta, st
    binf = path / WEIGHTS_BIN
    if binf.is_file():
        from ..checkpoint.reader import load_pickle_weights

        return load_pickle_weights(binf), {}, binf
    raise FormatError(f"{path}: has {CONFIG} but no {WEIGHTS} or {WEIGHTS_BIN}", path=path)


def _number(cfg: dict[str, Any], key: str, where: Path) -> float:
    value = cfg.get(key, _DEFAULTS[key])
    if value is None:
        value = _DEFAULTS[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FormatError(f"{where / CONFIG}: {key} must be a number, got {value!r}", path=where)
    return float(value)


@register_format
class PeftFormat(AdapterFormat):
    name = "peft"
    layout = "folder"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG).is_file()

    @classmethod
    def read(cls, path: Path, base: CheckpointReader | None = None) -> Adapter:
        cfg = _read_config(path)
        tensors, metadata, weights_file = _read_tensors(path)
        r_default = _number(cfg, "r", path)
        alpha_default = _number(cfg, "lora_alpha", path)
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False))

        parts: dict[str, dict[str, torch.Tensor]] = {}
        replacements: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            for suffix, role in _ROLES:
                if name.endswith(suffix):
                    parts.setdefault(name[: -len(suffix)], {})[role] = tensor
                    break
            else:
                if name.endswith(".base_layer.weight"):
                    name = name[: -len(".base_layer.weight")] + ".weight"
                name = name.replace(".modules_to_save.default.", ".")
                replacements[name] = tensor

        modules: dict[str, LoraModule] = {}
        for mod, p in sorted(parts.items()):
            emb = "down_emb" in p or "up_emb" in p
            down, up = p.get("down_emb" if emb else "down"), p.get("up_emb" if emb else "up")
            if down is None or up is None:
                missing = (
                    ("lora_embedding_A" if emb else "lora_A")
                    if down is None
                    else ("lora_embedding_B" if emb else "lora_B")
                )
                raise ValidationError(f"{weights_file}: module {mod} has no {missing} tensor", path=weights_file)
            alpha_key = get_pattern_key(list(alpha_pattern), mod)
            alpha = float(alpha_pattern[alpha_key]) if alpha_key is not None else alpha_default
            kind = "embedding" if emb else ("conv" if down.ndim > 2 else "linear")
            try:
                modules[mod] = LoraModule(
                    down=down,
                    up=up,
                    alpha=alpha,
                    kind=kind,
                    use_rslora=rslora,
                    fan_in_fan_out=fifo and kind == "linear",
                    magnitude=p.get("magnitude"),
                    bias=p.get("bias"),
                )
            except ValidationError as exc:
                raise type(exc)(
                    f"{weights_file}: module {mod}: {exc.message}", hint=exc.hint, path=weights_file
                ) from None
        return Adapter(
            modules=modules,
            replacements=replacements,
            meta={
                "format": "peft",
                "base_model": cfg.get("base_model_name_or_path"),
                "config": cfg,
                "metadata": metadata,
                "provenance": read_provenance(metadata),
                "declared_ranks": {
                    m: _declared_rank(mod_name=m, cfg=cfg, r=r_default, rp=rank_pattern) for m in modules
                },
                "files": [str(path / CONFIG), str(weights_file)],
            },
        )

    @classmethod
    def write(cls, adapter: Adapter, path: Path, provenance: dict[str, Any] | None = None, **options: Any) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        cfg = config_for(adapter)
        tensors: dict[str, torch.Tensor] = {}
        for name, m in adapter.modules.items():
            k = PREFIX + name
            if m.kind == "embedding":
                tensors[f"{k}.lora_embedding_A"] = m.down
                tensors[f"{k}.lora_embedding_B"] = m.up
            else:
                tensors[f"{k}.lora_A.weight"] = m.down
                tensors[f"{k}.lora_B.weight"] = m.up
            if m.bias is not None:
                tensors[f"{k}.lora_B.bias"] = m.bias
            if m.magnitude is not None:
                tensors[f"{k}.lora_magnitude_vector"] = m.magnitude
        for key, t in adapter.replacements.items():
            mod, _, suffix = key.rpartition(".")
            if mod in adapter.modules and adapter.modules[mod].kind == "embedding":
                key = f"{mod}.base_layer.{suffix}"
            tensors[PREFIX + key] = t
        metadata = {"format": "pt"}
        if provenance:
            metadata.update(provenance_metadata(provenance))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS), metadata=metadata)
        (path / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _declared_rank(mod_name: str, cfg: dict[str, Any], r: float, rp: dict[str, Any]) -> int:
    key = get_pattern_key(list(rp), mod_name)
    return int(rp[key]) if key is not None else int(r)


def config_for(adapter: Adapter) -> dict[str, Any]:
    """An ``adapter_config.json`` that makes PEFT rebuild exactly these modules, ranks and scales."""
    mods = adapter.modules
    if not mods and not adapter.replacements:
        raise ValidationError("the adapter has no modules to write")
    rslora = {m.use_rslora for m in mods.values()}
    if len(rslora) > 1:
        raise UnsupportedError(
            "PEFT cannot hold rsLoRA and plain LoRA modules in one adapter",
            hint="rescale (loratools rescale --alpha) to one convention first",
        )
    use_rslora = rslora.pop() if rslora else False
    rank_counts = Counter(m.rank for m in mods.values())
    alpha_counts = Counter(float(m.alpha) for m in mods.values())
    r = rank_counts.most_common(1)[0][0] if mods else 8
    alpha = alpha_counts.most_common(1)[0][0] if mods else 8.0
    rank_pattern = {re.escape(n): m.rank for n, m in mods.items() if m.rank != r}
    alpha_pattern = {re.escape(n): _num(m.alpha) for n, m in mods.items() if float(m.alpha) != alpha}
    targets = sorted({n.rsplit(".", 1)[-1] for n in mods})
    to_save = sorted({k.rpartition(".")[0] for k in adapter.replacements if k.rpartition(".")[0] not in mods})
    old = dict(adapter.meta.get("config") or {}) if adapter.format == "peft" else {}
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
    return cfg


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
