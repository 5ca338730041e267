"""``combine``: one adapter from several, per module, with weights w_i and scales s_i folded in.

Methods (c_i = w_i·s_i, ΔW_i = s_i·B_i·A_i):

- ``cat`` — exact: B = [√|c_1|·sgn(c_1)·B_1, …], A = [√|c_1|·A_1; …], rank Σ r_i, scale 1: ΔW = Σ w_i·ΔW_i.
- ``svd`` — the best rank-R approximation of that exact sum (Eckart–Young), from the factors alone.
- ``linear`` — PEFT's ``linear``: B = Σ √|c_i|·sgn(c_i)·B_i, A = Σ √|c_i|·A_i (equal ranks only). Not the
  weighted sum: the product adds cross terms √|c_i c_j|·B_i·A_j; kept for compatibility.
- ``ties``, ``dare_linear``, ``dare_ties`` — as PEFT's ``merge_utils`` (trim by magnitude / drop at random
  with rescaling, sign election by total mass, disjoint mean) on each module's exact dense ΔW_i, then
  re-factored to rank R by an SVD. Random drops use a generator seeded from ``seed`` and the module name.

The output uses scale 1 (alpha = r, or √r for rsLoRA when the first input is rsLoRA). DoRA adapters are
refused (magnitudes do not add). Full replacements (modules_to_save) are kept when only one input has
them or all agree; differing ones are refused.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.args.numeric_args import (
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    check_number,
    check_optional,
    check_weights,
)
from loratools.errors import ShapeError, UnsupportedError, UsageError

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter, LoraModule

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")


def _signature(m: LoraModule) -> tuple:
    return (m.kind, m.out_features, tuple(m.down.shape[1:]))


def _cat_factors(entries: list[tuple[float, LoraModule]]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    ups, downs = [], []
    for c, m in entries:
        up, down = m.factors(torch.float32)
        root = abs(c) ** 0.5
        ups.append(up * (root if c >= 0 else -root))
        downs.append(down * root)
    return torch.cat(ups, 1), torch.cat(downs, 0)


def _bias(entries: list[tuple[float, LoraModule]]) -> torch.Tensor | None:
    biases = [(c, m.bias) for c, m in entries if m.bias is not None]
    if not biases:
        return None
    total = sum(c * b.float() for c, b in biases)
    return total.to(biases[0][1].dtype)


def _generator(seed: int, name: str) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _dense_method(
    method: str, deltas: torch.Tensor, weights: torch.Tensor, density: float, gen: torch.Generator
) -> torch.Tensor:
    """PEFT's ties / dare_linear / dare_ties on stacked dense deltas (n×out×in)."""
    import torch

    if method == "ties":
        if density < 1:
            flat = deltas.reshape(deltas.shape[0], -1)
            k = int(density * flat.shape[1])
            mask = torch.zeros_like(flat)
            mask.scatter_(1, torch.topk(flat.abs(), k=k, dim=1).indices, 1.0)
            deltas = (flat * mask).reshape(deltas.shape)
    elif density < 1:  # dare: random drop, rescale by 1/density
        keep = torch.bernoulli(torch.full_like(deltas, density), generator=gen)
        deltas = deltas * keep / density
    weighted = deltas * weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    if method == "dare_linear":
        return weighted.sum(0)
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (deltas.sign() == majority).to(deltas.dtype)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def combine_module(
    name: str,
    entries: list[tuple[float, LoraModule]],
    *,
    method: str,
    rank: int | None,
    density: float,
    seed: int,
    use_rslora: bool,
) -> LoraModule | None:
    """The combined module (None when every weight is 0). ``entries`` are (weight, module) pairs."""
    import torch

    from loratools.model.lowrank import alpha_for_scale, dense_svd, lowrank_svd, rebuild

    template = replace(entries[0][1], use_rslora=use_rslora)
    scaled = [(w * m.scale, m) for w, m in entries if w * m.scale != 0]
    if not scaled:
        return None
    target = rank or max(m.rank for _, m in entries)
    bias = _bias(scaled)
    if method == "cat":
        up, down = _cat_factors(scaled)
    elif method == "svd":
        up, down = _cat_factors(scaled)
        svd = lowrank_svd(up, down)
        k = min(target, svd.rank)
        if k == 0:
            return None
        up, down = svd.split(k)
    elif method == "linear":
        ranks = {m.rank for _, m in scaled}
        if len(ranks) > 1:
            raise UsageError(
                f"module {name}: method 'linear' needs equal ranks, got {sorted(ranks)}",
                hint="use --method cat (exact) or svd (best rank-R)",
            )
        ups, downs = zip(*(f for f in (_cat_factors([e]) for e in scaled)), strict=True)
        up, down = sum(ups), sum(downs)
    else:
        deltas = torch.stack([(m.factors(torch.float32)[0] * m.scale) @ m.factors(torch.float32)[1] for _, m in scaled])
        weights = torch.tensor([w for w, m in entries if w * m.scale != 0], dtype=torch.float32)
        mixed = _dense_method(method, deltas, weights, density, _generator(seed, name))
        u, s, vh = dense_svd(mixed, target, generator=_generator(seed, name))
        k = int((s > 0).sum())
        if k == 0:
            return None
        root = s[:k].sqrt()
        up, down = u[:, :k] * root, root[:, None] * vh[:k]
    k = int(down.shape[0])
    out = rebuild(template, up, down, alpha_for_scale(1.0, k, use_rslora))
    return replace(out, bias=bias, magnitude=None)


def _replacements(adapters: list[Adapter], paths: list[str]) -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for ad, p in zip(adapters, paths, strict=True):
        for key, t in ad.replacements.items():
            if key in out and not (out[key].shape == t.shape and torch.equal(out[key], t)):
                raise UnsupportedError(
                    f"full tensor {key} differs between {origin[key]} and {p}; combine cannot weigh full weights",
                    hint="drop it from all but one input (or merge those adapters into the base instead)",
                )
            out.setdefault(key, t)
            origin.setdefault(key, p)
    return out


def _refuse_unused(method: str, rank: int | None, density: float | None, needs_density: bool) -> None:
    """An option the method does not use is refused, not ignored."""
    if method in ("cat", "linear") and rank is not None:
        why = "the exact sum: its rank is the sum of the input ranks" if method == "cat" else "rank-preserving"
        raise UsageError(
            f"--method {method} is {why}, so it takes no --rank",
            hint="for a rank-R result use --method svd --rank R",
        )
    if density is not None and not needs_density:
        raise UsageError(
            f"--method {method} keeps every entry, so it takes no --density",
            hint="--density is for --method ties, dare_linear or dare_ties",
        )


def _combined_meta(ads: list[Adapter], labels: list[str]) -> dict[str, Any]:
    """The combination's meta: a new artefact, so only what stays true of it. Plain entries (format, base
    model, …) are kept when every input agrees; file metadata is rebuilt by
    :func:`~loratools.formats.kohya.meta.combined_metadata` (sources named, training facts dropped); a
    config keeps the entries all configs share; kohya names of every input are pooled."""
    from loratools.formats.kohya.meta import combined_metadata

    rebuilt = ("metadata", "config", "kohya_names", "kohya_digest", "files", "declared_ranks", "provenance", "source")
    first = ads[0].meta
    meta: dict[str, Any] = {
        k: v for k, v in first.items() if k not in rebuilt and all(ad.meta.get(k) == v for ad in ads[1:])
    }
    meta["format"], meta["base_model"] = first.get("format"), first.get("base_model")
    sources = [ad.meta.get("metadata") or {} for ad in ads]
    if any(sources):
        meta["metadata"] = combined_metadata(sources, labels)
    configs = [ad.meta["config"] for ad in ads if isinstance(ad.meta.get("config"), dict)]
    if configs:
        meta["config"] = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs[1:])}
    names: dict[str, str] = {}
    for ad in ads:
        names.update(ad.meta.get("kohya_names") or {})
    if names:
        meta["kohya_names"] = names
    return meta


def combine(
    adapters: Sequence[Adapter | str | Path],
    *,
    weights: Sequence[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    base: str | Path | None = None,
    output: str | Path | None = None,
    to: str | None = None,
    overwrite: bool = False,
    trust_tensors: bool = False,
    kohya_prefix: str | None = None,
    allow_other_base: bool = False,
) -> Adapter:
    """Combine adapters (paths or Adapters) by ``method`` (see the module docstring); write if ``output``.

    ``weights`` default to 1 each; ``rank`` (svd, ties, dare_*) defaults per module to the largest input
    rank; ``density`` (ties, dare_*) is the fraction of entries kept; ``base`` resolves module names when
    the inputs are in different formats. The output is in the first input's format unless ``to``
    (``kohya_prefix`` names the modules of a kohya output). ``cat`` is exact and takes neither ``rank``
    nor ``density`` (refused, not ignored). Adapters that say they were trained on different models are
    refused, each checked against ``base`` when it is given, against each other otherwise (the rule of
    :mod:`loratools.ops.base_match`), unless ``allow_other_base``.
    """
    from loratools.ops._algebra_io import load, write

    if method not in METHODS:
        raise UsageError(f"unknown combine method {method!r}; expected one of {', '.join(METHODS)}")
    if len(adapters) < 1:
        raise UsageError("combine needs at least one adapter")
    weights = check_weights(weights, len(adapters))
    check_optional("--rank", rank, POSITIVE_INT)
    check_optional("--density", density, FRACTION)
    check_number("--seed", seed, NON_NEGATIVE_INT)
    needs_density = method in ("ties", "dare_linear", "dare_ties")
    _refuse_unused(method, rank, density, needs_density)
    if needs_density and density is None:
        raise UsageError(f"method {method} needs --density (the fraction of entries kept, e.g. 0.5)")
    reader = None
    if base is not None:
        from loratools.checkpoint.reader import open_checkpoint
        from loratools.formats.adapter_io import is_llamacpp_gguf

        reader = None if is_llamacpp_gguf(base) else open_checkpoint(base)  # a .gguf base is only a gguf target
    loaded = [load(a, base=reader, trust_tensors=trust_tensors) for a in adapters]
    ads = [ad for ad, _ in loaded]
    from loratools.model.adapter import require_lora

    for ad in ads:
        require_lora(ad, "combine")
    labels = [str(p or f"adapter #{i + 1}") for i, (_, p) in enumerate(loaded)]
    from loratools.model.alora import refuse_mix

    refuse_mix(ads, labels)  # aLoRA inputs act from their invocation tokens on: only alike ones combine
    if not allow_other_base:
        from loratools.ops.base_match import require_base, require_same_base

        if reader is not None:
            require_base(ads, labels, reader, base)
        elif base is None:
            require_same_base(ads, labels)
    use_rslora = any(m.use_rslora for m in ads[0].modules.values())

    names: list[str] = []
    for ad in ads:
        names += [n for n in ad.modules if n not in names]
    modules = {}
    for name in names:
        entries = [(w, ad.modules[name]) for w, ad in zip(weights, ads, strict=True) if name in ad.modules]
        where = [lab for lab, ad in zip(labels, ads, strict=True) if name in ad.modules]
        sig = _signature(entries[0][1])
        for (_, m), lab in zip(entries[1:], where[1:], strict=True):
            if _signature(m) != sig:
                raise ShapeError(
                    f"module {name}: {where[0]} has {sig[0]} {sig[1]}×{sig[2]}, {lab} has {_signature(m)[0]} "
                    f"{_signature(m)[1]}×{_signature(m)[2]}",
                    hint="the adapters were trained on different base models",
                )
        for (_, m), lab in zip(entries, where, strict=True):
            if m.magnitude is not None:
                raise UnsupportedError(
                    f"{lab}: module {name} is DoRA; DoRA magnitudes cannot be combined",
                    hint="merge each DoRA adapter into the base separately",
                )
        new = combine_module(
            name, entries, method=method, rank=rank, density=density or 1.0, seed=seed, use_rslora=use_rslora
        )
        if new is not None:
            modules[name] = new
    if not modules:
        raise UsageError("every module of the combination is zero (all weights 0?)")
    out = replace(ads[0], modules=modules, replacements=_replacements(ads, labels), meta=_combined_meta(ads, labels))
    if output is not None:
        params = {"method": method, "weights": weights, "rank": rank, "density": density, "seed": seed}
        inputs = {f"adapter_{i + 1}": p for i, (_, p) in enumerate(loaded)}
        write(
            out,
            output,
            operation="combine",
            parameters=params,
            inputs=inputs,
            to=to,
            overwrite=overwrite,
            kohya_prefix=kohya_prefix,
            base=base,
        )
    return out
