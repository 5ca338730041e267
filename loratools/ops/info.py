"""``info``: what an adapter holds, as one JSON-ready dict (the CLI renders it; docs/json.md documents it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapter import Adapter, LoraModule
    from ..checkpoint.reader import CheckpointReader


def module_record(name: str, m: LoraModule) -> dict[str, Any]:
    """One entry of ``modules``: name, kind, rank, alpha, scale and sizes in the base's terms."""
    rec: dict[str, Any] = {
        "name": name,
        "kind": m.kind,
        "rank": m.rank,
        "alpha": _num(m.alpha),
        "scale": m.scale,
        "in_features": m.in_features,
        "out_features": m.out_features,
    }
    if m.kind == "embedding":
        rec["num_embeddings"] = m.in_features
        rec["embedding_dim"] = m.out_features
    if m.kind == "conv":
        rec["in_channels"] = int(m.down.shape[1])
        rec["kernel_size"] = [int(s) for s in m.down.shape[2:]]
    rec["dora"] = m.magnitude is not None
    rec["bias"] = m.bias is not None
    rec["fan_in_fan_out"] = m.fan_in_fan_out
    rec["dtype"] = _dtype(m.down.dtype)
    return rec


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _one(values: set[Any]) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def size_on_disk(adapter: Adapter, path: Path) -> int:
    """Bytes of the adapter's own files (the format's file list, else everything at ``path``)."""
    files = [Path(f) for f in adapter.meta.get("files") or []]
    if not files:
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file())


def base_parameters(reader: CheckpointReader) -> int:
    """Parameters of a base checkpoint, from tensor headers only."""
    return sum(math.prod(reader.info(k).shape) for k in reader.keys())


def summarize(adapter: Adapter) -> dict[str, Any]:
    """The format-independent summary of an in-memory adapter (everything but disk and base facts)."""
    mods = adapter.modules
    scales = {round(m.scale, 12) for m in mods.values()}
    dtypes = sorted({_dtype(d) for d in adapter.dtypes()})
    cfg = adapter.meta.get("config") or {}
    metadata = {k: v for k, v in (adapter.meta.get("metadata") or {}).items() if k != "loratools"}
    from ..alora import invocation_tokens

    return {
        "format": adapter.format,
        "base_model": adapter.base_model,
        "num_modules": len(mods),
        "rank": _one(adapter.ranks()),
        "ranks": sorted(adapter.ranks()),
        "alpha": _num(a) if (a := _one(adapter.alphas())) is not None else None,
        "alphas": sorted(_num(a) for a in adapter.alphas()),
        "scale": next(iter(mods.values())).scale if len(scales) == 1 else None,
        "use_rslora": any(m.use_rslora for m in mods.values()),
        "use_dora": any(m.magnitude is not None for m in mods.values()),
        "lora_bias": any(m.bias is not None for m in mods.values()),
        "kinds": sorted({m.kind for m in mods.values()}),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}),
        "task_type": cfg.get("task_type"),
        "alora_invocation_tokens": invocation_tokens(adapter),
        "parameters": adapter.parameters,
        "dtype": dtypes[0] if len(dtypes) == 1 else None,
        "dtypes": dtypes,
        "replacements": [
            {"name": k, "shape": list(t.shape), "dtype": _dtype(t.dtype)}
            for k, t in sorted(adapter.replacements.items())
        ],
        "metadata": metadata,
        "provenance": adapter.meta.get("provenance"),
        "modules": [module_record(n, m) for n, m in sorted(mods.items())],
    }


def info(adapter_path: str | Path, base: str | Path | None = None, *, format: str | None = None) -> dict[str, Any]:
    """Describe the adapter at ``adapter_path`` (any registered format) as a JSON-ready dict.

    With ``base``, module names are normalized to the base's tensor names and the dict gains
    ``base_parameters`` and ``parameter_share`` (adapter parameters / base parameters).

    Example::

        >>> from loratools import info
        >>> d = info("fixtures/peft/llama-lora")
        >>> d["rank"], d["alpha"], d["num_modules"]
        (4, 7, 8)
    """
    from ..adapter_io import load_adapter
    from ..checkpoint.reader import open_checkpoint
    from ..hub import resolve_path

    local = resolve_path(adapter_path, "adapter")
    reader = open_checkpoint(base) if base is not None else None
    try:
        adapter = load_adapter(local, format=format, base=reader)
        data: dict[str, Any] = {"path": str(adapter_path)}
        data.update(summarize(adapter))
        data["size_on_disk"] = size_on_disk(adapter, local)
        data["base"] = None
        data["base_parameters"] = None
        data["parameter_share"] = None
        if reader is not None:
            total = base_parameters(reader)
            data["base"] = str(base)
            data["base_parameters"] = total
            data["parameter_share"] = adapter.parameters / total if total else None
            data["unresolved"] = list(adapter.meta.get("unresolved") or [])
        # the modules list reads best last
        data["modules"] = data.pop("modules")
        return data
    finally:
        if reader is not None:
            reader.close()
