"""PEFT adapters of the families beyond LoRA: LoHa, LoKr, OFT (v2 layout), BOFT and (IA)³.

Keys are ``base_model.model.<module>.<part>``; parts, config keys and scale rules per family:

- LOHA: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1``, ``hada_t2`` for
  ``use_effective_conv2d``); scale ``alpha / r`` with ``rank_pattern``/``alpha_pattern``.
- LOKR: ``lokr_w1`` or ``lokr_w1_a``/``_b``, ``lokr_w2`` or ``lokr_w2_a``/``_b``, optional ``lokr_t2``;
  scale ``alpha / r`` (r from the config, even when both halves are full matrices).
- OFT: ``oft_R.weight`` (blocks, b(b−1)/2); ``r``/``oft_block_size``, ``block_share``, ``coft``/``eps``,
  ``use_cayley_neumann``/``num_cayley_neumann_terms``. The v1 layout (``oft_r``) is refused.
- BOFT: ``boft_R`` (factors, blocks, b, b), ``boft_s`` (out, 1).
- IA3: ``ia3_l`` ((1, in) for ``feedforward_modules``, (out, 1) otherwise).

Sources checked: peft/tuners/{loha,lokr,oft,boft,ia3}/{layer,config}.py (PEFT 0.21).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, ShapeError, UnsupportedError
from loratools.families import BOFTModule, FamilyModule, IA3Module, LoHaModule, LoKrModule, OFTModule
from loratools.formats.peft.config_checks import boft_problem, oft_block_problem

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
#: PEFT type -> the tensor parts it uses (longest first)
PARTS: dict[str, tuple[str, ...]] = {
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2", "lokr_t2"),
    "OFT": ("oft_R.weight",),
    "BOFT": ("boft_R", "boft_s"),
    "IA3": ("ia3_l",),
}
FAMILY_TYPES = frozenset(PARTS)
#: canonical family name -> PEFT type
PEFT_TYPE = {"loha": "LOHA", "lokr": "LOKR", "oft": "OFT", "boft": "BOFT", "ia3": "IA3"}
_LORA_ONLY = frozenset(("r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "lora_dropout", "init_lora_weights"))


def split_family_key(key: str, peft_type: str) -> tuple[str, str | None]:
    """``(module, part)`` of a family tensor key; part None for a full tensor (modules_to_save)."""
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    for part in PARTS[peft_type]:
        if name.endswith("." + part):
            return name[: -len(part) - 1], part
    return name.replace(".modules_to_save.default.", "."), None


def _pattern_value(cfg: dict[str, Any], key: str, module: str, default: float) -> float:
    pattern = cfg.get(key) or {}
    if not isinstance(pattern, dict):
        raise FormatError(f"{key} must be an object of regex -> number")
    for p in pattern:  # PEFT's get_pattern_key: the first p with re.match(rf"(.*\.)?({p})$", module)
        try:
            if re.match(rf"(.*\.)?({p})$", module):
                return float(pattern[p])
        except re.error as exc:
            raise FormatError(f"{key} pattern {p!r} is not a valid regex: {exc}") from None
    return float(default)


def _targets_match(spec: Any, module: str) -> bool:
    """PEFT's target rule: a string is a full regex match, a list matches a name or a dotted suffix."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == t or module.endswith("." + t) for t in spec)


def read_family_modules(
    cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path
) -> tuple[dict[str, FamilyModule], dict[str, torch.Tensor]]:
    """The modules and full replacements of a PEFT family adapter."""
    peft_type = str(cfg.get("peft_type")).upper()
    if peft_type == "OFT" and any(k.endswith((".oft_r", ".oft_s")) for k in tensors):
        raise UnsupportedError(
            f"{where}: an OFT adapter in PEFT's old (v1, before 0.17) layout (oft_r); loratools reads the v2 layout",
            hint="load and re-save it with a current PEFT",
            path=where,
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        mod, part = split_family_key(key, peft_type)
        if part is None:
            if any(p in key for p in ("oft_", "boft_", "hada_", "lokr_", "ia3_", "lora_")):
                raise FormatError(f"{where}: tensor {key} is not a {peft_type} tensor loratools knows", path=where)
            replacements[mod] = t
        else:
            parts.setdefault(mod, {})[part] = t
    modules: dict[str, FamilyModule] = {}
    for mod, p in sorted(parts.items()):
        try:
            modules[mod] = _module(peft_type, cfg, mod, p)
        except (ShapeError, KeyError) as exc:
            msg = exc.message if isinstance(exc, ShapeError) else f"missing tensor {exc}"
            raise ShapeError(f"{where}: module {mod}: {msg}", path=where) from None
    return modules, replacements


def _module(peft_type: str, cfg: dict[str, Any], mod: str, p: dict[str, torch.Tensor]) -> FamilyModule:
    leaf = mod.rsplit(".", 1)[-1]
    fifo = bool(cfg.get("fan_in_fan_out")) and leaf not in ("lm_head", "score", "classifier")
    if peft_type == "LOHA":
        alpha = _pattern_value(cfg, "alpha_pattern", mod, cfg.get("alpha", 8))
        conv = p["hada_w1_b"].ndim > 2 or "hada_t1" in p
        return LoHaModule(
            w1a=p["hada_w1_a"],
            w1b=p["hada_w1_b"],
            w2a=p["hada_w2_a"],
            w2b=p["hada_w2_b"],
            alpha=alpha,
            t1=p.get("hada_t1"),
            t2=p.get("hada_t2"),
            kind="conv" if conv else "linear",
        )
    if peft_type == "LOKR":
        alpha = _pattern_value(cfg, "alpha_pattern", mod, cfg.get("alpha", 8))
        r = int(_pattern_value(cfg, "rank_pattern", mod, cfg.get("r", 8)))
        conv = "lokr_t2" in p or any(t.ndim > 2 for t in p.values())
        return LoKrModule.from_parts(
            p,
            alpha=alpha,
            r=r,
            rule="peft",
            kind="conv" if conv else "linear",
        )
    if peft_type == "OFT":
        w = p["oft_R.weight"]
        share = bool(cfg.get("block_share", False))
        oft = OFTModule(
            weight=w,
            n_blocks=None if share else int(w.shape[0]),
            block_share=share,
            use_cayley_neumann=bool(cfg.get("use_cayley_neumann", True)),
            num_cayley_neumann_terms=int(cfg.get("num_cayley_neumann_terms", 5)),
            coft=bool(cfg.get("coft", False)),
            eps=float(cfg.get("eps", 6e-5)),
            fan_in_fan_out=fifo,
        )
        problem = None if share else oft_block_problem(cfg, int(w.shape[0]), oft.block_size)
        if problem:  # PEFT would build other blocks than the file holds (with block_share the base decides)
            raise ShapeError(problem)
        return oft
    if peft_type == "BOFT":
        boft = BOFTModule(R=p["boft_R"], s=p["boft_s"], fan_in_fan_out=fifo)
        problem = boft_problem(cfg, int(boft.R.shape[1]), int(boft.R.shape[2]))
        if problem:
            raise ShapeError(problem)
        return boft
    v = p["ia3_l"]
    if v.ndim == 2:
        ff = v.shape[0] == 1 and (v.shape[1] != 1 or _targets_match(cfg.get("feedforward_modules"), mod))
        kind = "linear"
    else:
        ff, kind = _targets_match(cfg.get("feedforward_modules"), mod), "conv"
    return IA3Module(vector=v, feedforward=ff, kind=kind, fan_in_fan_out=fifo)


def family_of(modules: dict[str, Any]) -> str:
    """The one PEFT type all (non-LoRA) modules share; UnsupportedError when they mix."""
    kinds = {getattr(m, "family", "lora") for m in modules.values()}
    if len(kinds) != 1 or next(iter(kinds)) not in PEFT_TYPE:
        raise UnsupportedError(
            f"a PEFT adapter holds one family; this one has {', '.join(sorted(kinds))}",
            hint="write a kohya-style file (--to kohya), or lower all to LoRA: loratools convert ADAPTER --to peft "
            "--as-lora -o OUT",
        )
    return PEFT_TYPE[next(iter(kinds))]


def family_tensors(adapter: Any) -> dict[str, torch.Tensor]:
    """The PEFT state dict of a family adapter."""
    out: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        for part, t in m.tensors().items():
            if part == "dora_scale":
                raise UnsupportedError(
                    f"module {name}: PEFT {m.label} has no weight decomposition (LyCORIS dora_scale)",
                    hint="keep it a kohya-style file, or lower it: loratools convert ADAPTER --to peft --as-lora "
                    "--base BASE -o OUT",
                )
            out[f"{PREFIX}{name}.{part}"] = t.contiguous()
    for key, t in adapter.replacements.items():
        out[PREFIX + key] = t.contiguous()
    return out


def family_config(adapter: Any) -> dict[str, Any]:
    """An ``adapter_config.json`` that makes PEFT rebuild exactly these family modules."""
    mods = adapter.modules
    peft_type = family_of(mods)
    old = dict(adapter.meta.get("config") or {})
    cfg: dict[str, Any] = (
        {k: v for k, v in old.items() if k not in _LORA_ONLY} if old.get("peft_type") == peft_type else {}
    )
    from loratools.formats.peft.config import kept_targets

    kept = kept_targets(adapter, mods)  # the user's short names when the module set is unchanged
    targets = kept["target_modules"] if kept else sorted(mods)  # else full paths: a leaf name could wrap more
    to_save = sorted({k.rpartition(".")[0] for k in adapter.replacements if k.rpartition(".")[0] not in mods})
    cfg.update(
        {
            "peft_type": peft_type,
            "base_model_name_or_path": adapter.base_model,
            "target_modules": targets,
            "modules_to_save": to_save or None,
            "inference_mode": True,
        }
    )
    cfg.setdefault("task_type", adapter.meta.get("task_type"))
    if peft_type in ("LOHA", "LOKR"):
        ranks = {n: m.rank for n, m in mods.items()}
        alphas = {n: _num(m.scale * m.rank) for n, m in mods.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        cfg.update(
            {
                "r": r,
                "alpha": alpha,
                "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
                "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
                "use_effective_conv2d": any(
                    getattr(m, "tucker", False) or getattr(m, "t2", None) is not None for m in mods.values()
                ),
            }
        )
        cfg.setdefault("init_weights", True)
        if peft_type == "LOKR":
            cfg["decompose_both"] = any(m.w1 is None for m in mods.values())
    elif peft_type == "OFT":
        sizes = {m.block_size for m in mods.values()}
        counts = {m.n_blocks for m in mods.values()}
        shares = {m.block_share for m in mods.values()}
        neumann = {(m.use_cayley_neumann, m.num_cayley_neumann_terms, m.coft, m.eps) for m in mods.values()}
        if (len(sizes) > 1 and (len(counts) > 1 or None in counts)) or len(shares) > 1 or len(neumann) > 1:
            raise UnsupportedError("PEFT's OFT config holds one block size (or count) and one Cayley setting")
        ((use_neumann, terms, coft, eps),) = neumann
        r, size = (0, sizes.pop()) if len(sizes) == 1 else (counts.pop(), 0)
        cfg.update(
            {
                "r": r,
                "oft_block_size": size,
                "block_share": shares.pop(),
                "coft": coft,
                "eps": eps,
                "use_cayley_neumann": use_neumann,
                "num_cayley_neumann_terms": terms,
            }
        )
    elif peft_type == "BOFT":
        sizes = {int(m.R.shape[2]) for m in mods.values()}
        factors = {int(m.R.shape[0]) for m in mods.values()}
        if len(sizes) > 1 or len(factors) > 1:
            raise UnsupportedError("PEFT's BOFT config holds one block size and butterfly factor for all modules")
        cfg.update({"boft_block_size": sizes.pop(), "boft_block_num": 0, "boft_n_butterfly_factor": factors.pop()})
    else:  # with the user's target_modules kept, their feedforward_modules (a subset of them, PEFT checks)
        own = old.get("feedforward_modules") if kept else None
        cfg["feedforward_modules"] = own if own is not None else sorted(n for n, m in mods.items() if m.feedforward)
    if peft_type in ("OFT", "BOFT", "IA3"):
        cfg["fan_in_fan_out"] = any(m.fan_in_fan_out for m in mods.values())
    return cfg


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def read_adapter(
    path: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, str], weights_file: Path
) -> Any:
    """The :class:`~loratools.model.adapter.Adapter` of a PEFT family folder."""
    from loratools.model.adapter import Adapter
    from loratools.publishing.publish import read_provenance

    modules, replacements = read_family_modules(cfg, tensors, weights_file)
    return Adapter(
        modules=modules,  # type: ignore[arg-type]
        replacements=replacements,
        meta={
            "format": "peft",
            "family": PEFT_TYPE_NAMES[str(cfg.get("peft_type")).upper()],
            "base_model": cfg.get("base_model_name_or_path"),
            "config": cfg,
            "metadata": metadata,
            "provenance": read_provenance(metadata),
            "files": [str(path / "adapter_config.json"), str(weights_file)],
            "config_modules": sorted(modules),  # what target_modules selected (config.kept_targets)
        },
    )


def write_adapter(adapter: Any, path: Path, provenance: dict[str, Any] | None = None) -> None:
    """Write a family adapter as a PEFT folder (config + safetensors)."""
    import json

    from loratools.files.safetensors_file import save_file
    from loratools.publishing.publish import provenance_metadata

    cfg = family_config(adapter)
    tensors = family_tensors(adapter)
    metadata = {"format": "pt"}
    if provenance:
        metadata.update(provenance_metadata(provenance))
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata=metadata)
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def has_family(adapter: Any) -> bool:
    """True when any module of ``adapter`` is not plain LoRA."""
    return any(isinstance(m, FamilyModule) for m in adapter.modules.values())


PEFT_TYPE_NAMES = {v: k for k, v in PEFT_TYPE.items()}
