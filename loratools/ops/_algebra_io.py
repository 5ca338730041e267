"""Input and output plumbing shared by the low-rank algebra verbs (resize, rescale, combine, extract)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapter import Adapter

#: bytes added to the tensor payload when estimating an output's size (config, header, metadata)
_OVERHEAD = 1 << 20


def load(adapter: Adapter | str | Path, base: Any = None) -> tuple[Adapter, Path | None]:
    """An Adapter and its path (None when an Adapter object was passed)."""
    from ..adapter import Adapter
    from ..adapter_io import load_adapter
    from ..hub import resolve_path

    if isinstance(adapter, Adapter):
        return adapter, None
    return load_adapter(adapter, base=base), resolve_path(adapter, "adapter")


def payload_bytes(adapter: Adapter) -> int:
    """The size of the adapter's tensors on disk (plus a margin for headers and config)."""
    n = _OVERHEAD
    for m in adapter.modules.values():
        for t in (m.down, m.up, m.magnitude, m.bias):
            if t is not None:
                n += t.numel() * t.element_size()
    for t in adapter.replacements.values():
        n += t.numel() * t.element_size()
    return n


def fresh_meta(adapter: Adapter) -> dict[str, Any]:
    """A copy of ``adapter.meta`` without what described the input file rather than the content."""
    meta = dict(adapter.meta)
    for stale in ("declared_ranks", "files", "provenance", "source"):
        meta.pop(stale, None)
    return meta


def write(
    adapter: Adapter,
    output: str | Path,
    *,
    operation: str,
    parameters: dict[str, Any],
    inputs: dict[str, str | Path | None],
    to: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``adapter`` atomically in ``to`` (default: its own format) with a provenance record."""
    from ..adapter_io import save_adapter
    from ..publish import check_disk_space, describe_input, provenance

    adapter = replace(adapter, meta=fresh_meta(adapter))
    check_disk_space(output, payload_bytes(adapter))
    record = provenance(
        operation,
        parameters,
        {name: describe_input(path) for name, path in inputs.items() if path is not None},
    )
    paths = tuple(p for p in inputs.values() if p is not None)
    return save_adapter(adapter, output, format=to, overwrite=overwrite, inputs=paths, provenance=record)
