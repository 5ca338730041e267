"""Expert slices back into PEFT ``target_parameters`` tensors: the exact inverse of :mod:`.experts`' reader.

Per stacked parameter (all its expert slices): ``lora_A`` ``(E·R, in)`` with expert e in rows ``e·R … e·R+R-1``,
``lora_B`` ``(out, E·R)`` with expert e in columns ``k·E+e`` (``stack(B_e, dim=2).reshape(out, R·E)``); one rank R
and one alpha per parameter (PEFT's ``rank_pattern`` / ``alpha_pattern`` keyed by the parameter path). Slices of
one parameter that differ in rank are zero-padded to the largest (exact); a different scale is folded into B.
An expert with no slice gets zero factors (ΔW = 0). Two parameters of one module are nested wrappers: the one
the model registers first is the innermost (``<module>.base_layer.lora_*``), as PEFT builds them.

Plain modules the reader found as 2-D parameter wrappers (a router ``weight``, meta ``param_modules``) go back
to ``target_parameters`` as ``<module>.weight``; every other plain module is written as PEFT writes modules.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from loratools.errors import UnsupportedError
from loratools.formats.peft.experts import REGISTRATION_ORDER

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from loratools.model.adapter import Adapter
    from loratools.model.experts import ExpertLoraModule

PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer"


def _packed(parameter: str, slices: list[ExpertLoraModule]) -> tuple[torch.Tensor, torch.Tensor, int, float, bool]:
    """``(lora_A, lora_B, R, alpha, use_rslora)`` of one stacked parameter."""
    import torch

    num = slices[0].num_experts
    rslora = {m.use_rslora for m in slices}
    shapes = {(m.out_features, m.in_features) for m in slices}
    if len(rslora) > 1 or len(shapes) > 1 or {m.num_experts for m in slices} != {num}:
        raise UnsupportedError(
            f"writing PEFT: the expert slices of {parameter} disagree on rsLoRA, shape or expert count; PEFT holds "
            "one LoRA per stacked parameter",
            hint="rescale (loratools rescale --alpha) the adapter to one convention first",
        )
    use_rslora = rslora.pop()
    rank = max(m.rank for m in slices)
    scales = Counter(m.scale for m in slices)
    scale = scales.most_common(1)[0][0]
    alpha = scale * (rank**0.5 if use_rslora else rank)
    out, inn = shapes.pop()
    dtype = slices[0].up.dtype
    a = torch.zeros(num, rank, inn, dtype=dtype)
    b = torch.zeros(out, rank, num, dtype=dtype)
    for m in slices:
        r = m.rank
        a[m.expert, :r] = m.down.to(dtype)
        up = m.up if m.scale == scale else (m.up.float() * (m.scale / scale)).to(dtype)
        b[:, :r, m.expert] = up.to(dtype)
    return a.reshape(num * rank, inn), b.reshape(out, rank * num), rank, _num(alpha), use_rslora


def _nesting(host: str, params: list[str]) -> dict[str, int]:
    """Nesting depth of each wrapped parameter of ``host`` (0 = outermost); refused when not certain."""
    if len(params) == 1:
        return {params[0]: 0}
    unknown = [p for p in params if p not in REGISTRATION_ORDER]
    if unknown:
        raise UnsupportedError(
            f"writing PEFT: module {host} would hold {len(params)} nested LoRA wrappers ({', '.join(params)}); "
            f"their order follows the order the model registers them, which loratools does not know for "
            f"{', '.join(unknown)}",
            hint="write the parameters apart (loratools convert ADAPTER --to peft --include REGEX -o OUT) or merge the "
            "adapter instead",
        )
    registered = sorted(params, key=REGISTRATION_ORDER.index)  # registered first = innermost
    return {p: len(params) - 1 - i for i, p in enumerate(registered)}


def expert_tensors(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT tensors of every expert slice and 2-D parameter wrapper, and the config fields they need:
    ``target_parameters``, ``rank_pattern`` / ``alpha_pattern`` entries per parameter path, ``use_rslora``."""
    from loratools.model.experts import expert_groups

    groups = expert_groups(adapter)
    wrapped = param_modules(adapter)
    by_host: dict[str, list[str]] = {}
    for parameter in groups:
        host, _, leaf = parameter.rpartition(".")
        by_host.setdefault(host, []).append(leaf)
    for module in wrapped:
        by_host.setdefault(module, []).append("weight")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    rslora: set[bool] = set()
    for host, params in sorted(by_host.items()):
        depth = _nesting(host, params)
        for leaf in params:
            path = f"{host}.{leaf}"
            if leaf == "weight" and path not in groups:
                m = adapter.modules[host]
                a, b, r, alpha, rs = m.down, m.up, m.rank, _num(m.alpha), m.use_rslora
            else:
                a, b, r, alpha, rs = _packed(path, groups[path])
            key = PREFIX + host + _BASE_LAYER * depth[leaf]
            tensors[f"{key}.lora_A.weight"] = a
            tensors[f"{key}.lora_B.weight"] = b
            ranks[path], alphas[path] = r, alpha
            rslora.add(rs)
    if len(rslora) > 1:
        raise UnsupportedError(
            "writing PEFT: rsLoRA and plain LoRA parameters in one adapter (use_rslora is one flag)",
            hint="rescale (loratools rescale --alpha) the adapter to one convention first",
        )
    targets = sorted(ranks)
    kept = adapter.meta.get("config_parameters")
    cfg = (adapter.meta.get("config") or {}) if adapter.format in ("peft", "vllm-moe") else {}
    if isinstance(kept, list) and sorted(kept) == targets and isinstance(cfg.get("target_parameters"), list):
        targets = list(cfg["target_parameters"])  # the user's own short names select exactly these parameters
    return tensors, {"target_parameters": targets, "ranks": ranks, "alphas": alphas, "use_rslora": rslora.pop()}


def param_modules(adapter: Adapter) -> list[str]:
    """The plain modules the reader found as 2-D parameter wrappers (PEFT targets their ``weight``)."""
    names = adapter.meta.get("param_modules") or []
    return sorted(n for n in names if n in adapter.modules and adapter.modules[n].rank > 0)


def expert_config(plain_cfg: dict[str, Any] | None, fields: dict[str, Any], adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json: the plain modules' config (or a bare one) with the wrapped parameters added;
    the global r / lora_alpha stay those of the plain modules, each parameter gets a pattern where it differs."""
    ranks, alphas = fields["ranks"], fields["alphas"]
    if plain_cfg is None:
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        # vllm-moe folders carry the PEFT config they were converted from (auto_mapping: the model type)
        old = dict(adapter.meta.get("config") or {}) if adapter.format in ("peft", "vllm-moe") else {}
        plain_cfg = {
            **{k: v for k, v in old.items() if k not in ("layers_to_transform", "layers_pattern", "exclude_modules")},
            "peft_type": "LORA",
            "base_model_name_or_path": adapter.base_model,
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {},
            "alpha_pattern": {},
            "target_modules": [],
            "modules_to_save": None,
            "use_dora": False,
            "lora_bias": False,
            "fan_in_fan_out": False,
            "bias": "none",
            "inference_mode": True,
            "init_lora_weights": True,
            "lora_dropout": old.get("lora_dropout", 0.0),
            "task_type": old.get("task_type", adapter.meta.get("task_type")),
        }
    elif plain_cfg.get("use_rslora") and not fields["use_rslora"] or (
        fields["use_rslora"] and not plain_cfg.get("use_rslora") and plain_cfg.get("target_modules")
    ):
        raise UnsupportedError(
            "writing PEFT: rsLoRA and plain LoRA modules in one adapter (use_rslora is one flag)",
            hint="rescale (loratools rescale --alpha) the adapter to one convention first",
        )
    cfg = dict(plain_cfg)
    cfg["use_rslora"] = fields["use_rslora"]
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    cfg["rank_pattern"] = {**cfg.get("rank_pattern", {}), **{re.escape(p): v for p, v in ranks.items() if v != r}}
    cfg["alpha_pattern"] = {
        **cfg.get("alpha_pattern", {}),
        **{re.escape(p): v for p, v in alphas.items() if float(v) != alpha},
    }
    cfg["target_parameters"] = fields["target_parameters"]
    return cfg


def write_with_experts(adapter: Adapter, path: Path, provenance: dict[str, Any] | None, write_plain: Any) -> None:
    """Write ``adapter`` as one PEFT folder: its plain modules through ``write_plain`` (the PEFT writer), then
    the parameter wrappers added to the same safetensors file and config."""
    import json
    from dataclasses import replace

    from loratools.files.safetensors_file import load_file, save_file
    from loratools.model.experts import is_expert
    from loratools.publishing.publish import provenance_metadata

    tensors, fields = expert_tensors(adapter)
    wrapped = set(param_modules(adapter))
    plain = {n: m for n, m in adapter.modules.items() if not is_expert(m) and n not in wrapped}
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    plain_cfg = None
    metadata = {"format": "pt", **(provenance_metadata(provenance) if provenance else {})}
    if any(m.rank > 0 for m in plain.values()) or adapter.replacements:
        meta = {k: v for k, v in adapter.meta.items() if k != "param_modules"}
        write_plain(replace(adapter, modules=plain, meta=meta), path, provenance=provenance)
        written, metadata = load_file(weights)
        tensors = {**written, **tensors}
        plain_cfg = json.loads(config.read_text(encoding="utf-8"))
    path.mkdir(parents=True, exist_ok=True)
    cfg = expert_config(plain_cfg, fields, adapter)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata=metadata)
    config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
