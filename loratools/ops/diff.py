"""``diff``: compare two adapters module by module, from r×r products of their factors.

For each module both have: the ranks, ‖ΔW_a‖_F, ‖ΔW_b‖_F, ‖ΔW_a − ΔW_b‖_F/‖ΔW_a‖_F (from the R factors
of the stacked factors, so near-identical adapters give small numbers rather than cancellation noise)
and the cosine ⟨ΔW_a, ΔW_b⟩/(‖ΔW_a‖·‖ΔW_b‖). ΔW is compared as the out×in matrix, so adapters stored in
different layouts (fan_in_fan_out, kohya vs PEFT) compare correctly once their names agree (``base``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter

#: configuration facts compared between the two adapters
_FACTS = ("format", "base_model", "ranks", "alphas", "use_rslora", "use_dora", "fan_in_fan_out", "dtypes")


def _facts(ad: Adapter) -> dict[str, Any]:
    mods = ad.modules.values()
    return {
        "format": ad.format,
        "base_model": ad.base_model,
        "ranks": sorted(ad.ranks()),
        "alphas": sorted(ad.alphas()),
        "use_rslora": sorted({m.use_rslora for m in mods}),
        "use_dora": sorted({m.magnitude is not None for m in mods}),
        "fan_in_fan_out": sorted({m.fan_in_fan_out for m in mods}),
        "dtypes": sorted(str(d).replace("torch.", "") for d in ad.dtypes()),
        "replacements": sorted(ad.replacements),
    }


def config_differences(a: Adapter, b: Adapter) -> dict[str, dict[str, Any]]:
    """``{key: {"a": value, "b": value}}`` for configuration facts (and raw config keys) that differ."""
    fa, fb = _facts(a), _facts(b)
    out = {k: {"a": fa[k], "b": fb[k]} for k in fa if fa[k] != fb[k]}
    ca, cb = a.meta.get("config") or {}, b.meta.get("config") or {}
    for key in _CONFIG_KEYS:
        va, vb = ca.get(key), cb.get(key)
        if isinstance(va, list) and isinstance(vb, list):
            va, vb = sorted(map(str, va)), sorted(map(str, vb))
        if ca and cb and va != vb:
            out[f"config.{key}"] = {"a": ca.get(key), "b": cb.get(key)}
    return out


#: raw config keys that change what an adapter does (ranks/alphas are compared per module already;
#: writer bookkeeping such as init_lora_weights, inference_mode or peft_version is left out)
_CONFIG_KEYS = ("task_type", "target_modules", "modules_to_save", "bias", "lora_bias", "layers_to_transform")


def module_difference(name: str, ma: Any, mb: Any, reader: Any = None) -> dict[str, Any]:
    """One row of the diff for a module both adapters have (``reader``: the base, for W-dependent updates)."""
    from loratools.model.lowrank import difference_norm, module_inner, module_norm

    if not (hasattr(ma, "down") and hasattr(mb, "down")) or ma.needs_base or mb.needs_base:
        return _dense_difference(name, ma, mb, reader)

    row: dict[str, Any] = {"name": name, "rank_a": ma.rank, "rank_b": mb.rank}
    shape_a = (ma.out_features, ma.in_features)
    shape_b = (mb.out_features, mb.in_features)
    if shape_a != shape_b or ma.kind != mb.kind:
        row.update(
            norm_a=None,
            norm_b=None,
            relative_difference=None,
            cosine=None,
            error=f"shapes differ: {ma.kind} {shape_a} vs {mb.kind} {shape_b}",
        )
        return row
    na, nb = module_norm(ma), module_norm(mb)
    dist = difference_norm(ma, mb)
    row["norm_a"] = na
    row["norm_b"] = nb
    row["relative_difference"] = dist / na if na > 0 else (0.0 if dist == 0 else None)
    row["cosine"] = module_inner(ma, mb) / (na * nb) if na > 0 and nb > 0 else None
    return row


def _dense_difference(name: str, ma: Any, mb: Any, reader: Any) -> dict[str, Any]:
    """The generic path (other families, DoRA): both exact ΔW as dense fp64 matrices."""
    import torch

    from loratools.errors import LoratoolsError
    from loratools.families.dense import delta_matrix, needs_base

    row: dict[str, Any] = {"name": name, "rank_a": ma.rank, "rank_b": mb.rank}
    try:
        w = None
        if needs_base(ma) or needs_base(mb):
            from loratools.checkpoint.keymap import KeyMatcher

            key = KeyMatcher(reader.keys()).tensor_key(name) if reader is not None else None
            w = reader.get(key) if key is not None else None
        da, db = delta_matrix(ma, w, name), delta_matrix(mb, w, name)
    except LoratoolsError as exc:
        row.update(norm_a=None, norm_b=None, relative_difference=None, cosine=None, error=exc.message)
        return row
    if da.shape != db.shape:
        row.update(norm_a=None, norm_b=None, relative_difference=None, cosine=None,
                   error=f"shapes differ: {tuple(da.shape)} vs {tuple(db.shape)}")
        return row
    na, nb, dist = float(da.norm()), float(db.norm()), float((da - db).norm())
    row.update(norm_a=na, norm_b=nb, relative_difference=dist / na if na > 0 else (0.0 if dist == 0 else None),
               cosine=float((da * db).sum()) / (na * nb) if na > 0 and nb > 0 else None)
    del torch
    return row


def diff(
    a: Adapter | str | Path,
    b: Adapter | str | Path,
    *,
    base: str | Path | None = None,
    trust_tensors: bool = False,
) -> dict[str, Any]:
    """Compare adapters ``a`` and ``b`` (paths or Adapters); ``base`` resolves names across formats.

    An adapter whose config rank disagrees with its tensors is refused unless ``trust_tensors`` (its
    scale, and so every norm, is a guess: :mod:`loratools.model.ambiguity`).

    Adapters in two formats with no module name in common (PEFT vs kohya names) need ``base``: a
    UsageError says so rather than an empty comparison.

    Returns ``{"modules": [...], "only_in_a": [...], "only_in_b": [...], "config": {...}}`` with the
    module rows sorted by relative difference, largest first (see docs/json.md).
    """
    from loratools.ops._algebra_io import load

    reader = None
    if base is not None:
        from loratools.checkpoint.reader import open_checkpoint
        from loratools.ops.info import require_model

        require_model(base, f"loratools diff {a} {b}")
        reader = open_checkpoint(base)
    ad_a, _ = load(a, base=reader, trust_tensors=trust_tensors)
    ad_b, _ = load(b, base=reader, trust_tensors=trust_tensors)
    common = [n for n in ad_a.modules if n in ad_b.modules]
    if not common and base is None and ad_a.format != ad_b.format and ad_a.modules and ad_b.modules:
        from loratools.errors import UsageError

        raise UsageError(
            f"{a} ({ad_a.format}) and {b} ({ad_b.format}) share no module name: the two formats name "
            "modules differently, so nothing can be compared without the model",
            hint=f"pass the model they are for: loratools diff {a} {b} --base MODEL",
        )
    rows = [module_difference(n, ad_a.modules[n], ad_b.modules[n], reader) for n in common]
    rows.sort(key=lambda r: (r["relative_difference"] is None, -(r["relative_difference"] or 0.0), r["name"]))
    return {
        "modules": rows,
        "only_in_a": sorted(set(ad_a.modules) - set(ad_b.modules)),
        "only_in_b": sorted(set(ad_b.modules) - set(ad_a.modules)),
        "config": config_differences(ad_a, ad_b),
    }
