"""Loading and saving adapters through the format registry (local paths or Hub references)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .finite import check_tensors
from .formats.registry import detect_format, get_format
from .hub import resolve_path
from .publish import atomic_output, check_output_layout

if TYPE_CHECKING:
    from .adapter import Adapter
    from .checkpoint.reader import CheckpointReader


def load_adapter(
    path: str | Path,
    *,
    format: str | None = None,
    base: str | Path | CheckpointReader | None = None,
) -> Adapter:
    """Read an adapter in any registered format into the canonical :class:`Adapter`.

    With ``base`` (a path or an open :class:`CheckpointReader`), module names are resolved against the
    base's real tensor names (kohya names need this) and normalized to them.
    """
    from .checkpoint.reader import CheckpointReader, open_checkpoint

    local = resolve_path(path, "adapter")
    fmt = get_format(format) if format else detect_format(local)
    reader = None
    if base is not None:
        reader = base if isinstance(base, CheckpointReader) else open_checkpoint(base)
    adapter = fmt.read(local, base=reader)
    adapter.meta.setdefault("source", str(path))
    check_tensors(adapter, weights_label(adapter, local))
    if reader is not None:
        from .checkpoint.keymap import normalize_adapter

        adapter = normalize_adapter(adapter, reader)
    return adapter


def save_adapter(
    adapter: Adapter,
    path: str | Path,
    *,
    format: str | None = None,
    overwrite: bool = False,
    inputs: tuple[str | Path, ...] = (),
    provenance: dict[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Write ``adapter`` in ``format`` (default: the format it was read from, else PEFT), atomically."""
    fmt = get_format(format or adapter.format or "peft")
    check_output_layout(fmt.name, fmt.layout, path)
    check_tensors(adapter, f"the output {path}")
    with atomic_output(path, overwrite=overwrite, inputs=inputs, directory=fmt.layout == "folder") as tmp:
        fmt.write(adapter, tmp, provenance=provenance, **options)
    return Path(path)


def weights_label(adapter: Adapter, local: Path) -> str:
    """The one weights file an adapter was read from (for messages), else its folder."""
    files = [f for f in adapter.meta.get("files") or [] if not str(f).endswith(".json")]
    return str(files[0]) if len(files) == 1 else str(local)
