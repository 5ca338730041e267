"""An adapter read for ``info`` and ``validate`` without holding its huge tensors: the format reader builds
its modules from data-less placeholders for every float tensor of ``LAZY_MIN_BYTES`` or more (their shapes
and dtypes come from the checked header), and the NaN/Inf check every reader's result gets scans those
tensors in chunks (:mod:`loratools.files.tensor_scan`). A 2 GiB tensor then costs one chunk, not 6 GB.

Readers that compute on their tensors (kohya's content digest, pickles, GGUF) fall back to the eager
``load_adapter``: same result, same messages, the adapter held whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.reader import CheckpointReader
    from loratools.files.safetensors_file import LazySources
    from loratools.model.adapter import Adapter

#: float tensors this large stay in their file; smaller ones (every tensor of a usual adapter) are loaded
LAZY_MIN_BYTES = 64 * 1024 * 1024


def load_streamed(local: Path, *, format: str | None = None, base: CheckpointReader | None = None) -> Adapter:
    """``load_adapter(local, format=format, base=base)`` with huge tensors left in the file, checked in chunks."""
    from loratools.errors import LoratoolsError
    from loratools.files.safetensors_file import lazy_tensors
    from loratools.formats.adapter_io import load_adapter, weights_label
    from loratools.formats.registry import detect_format, get_format
    from loratools.model.adapter import module_tensors

    fmt = get_format(format) if format else detect_format(local)
    if fmt.name == "gguf":
        return load_adapter(local, format=format, base=base)
    try:
        with lazy_tensors(LAZY_MIN_BYTES) as sources:
            adapter = fmt.read(local, base=base)
    except LoratoolsError:
        raise
    except Exception:  # noqa: BLE001 - a reader that computes on its tensors: the eager path
        return load_adapter(local, format=format, base=base)
    held = [t for m in adapter.modules.values() for t in module_tensors(m).values()]
    held += list(adapter.replacements.values())
    if any(t.is_meta and sources.source(t) is None for t in held):
        return load_adapter(local, format=format, base=base)
    adapter.meta.setdefault("source", str(local))
    adapter.meta["lazy_sources"] = sources
    check_streamed(adapter, weights_label(adapter, local), sources)
    if base is not None:
        from loratools.checkpoint.keymap import normalize_adapter

        adapter = normalize_adapter(adapter, base)
    return adapter


def read_streamed(fmt: Any, local: Path, base: Any = None) -> Adapter:
    """``fmt.read(local, base=base)`` with huge float tensors as placeholders (``validate``'s read; it checks
    NaN/Inf itself, from the files); an eager read where the reader computes on its tensors."""
    from loratools.errors import LoratoolsError
    from loratools.files.safetensors_file import lazy_tensors
    from loratools.model.adapter import module_tensors

    if fmt.name == "gguf":
        return fmt.read(local, base=base)
    try:
        with lazy_tensors(LAZY_MIN_BYTES) as sources:
            adapter = fmt.read(local, base=base)
    except LoratoolsError:
        raise
    except Exception:  # noqa: BLE001 - a reader that computes on its tensors
        return fmt.read(local, base=base)
    held = [t for m in adapter.modules.values() for t in module_tensors(m).values()]
    if any(t.is_meta and sources.source(t) is None for t in held + list(adapter.replacements.values())):
        return fmt.read(local, base=base)
    adapter.meta["lazy_sources"] = sources
    return adapter


def check_streamed(adapter: Adapter, where: str | Path, sources: LazySources) -> None:
    """``model.finite.check_tensors`` (same order) with placeholders scanned in chunks (named by their file key)."""
    from loratools.errors import NumericError
    from loratools.files.tensor_scan import scan_tensor
    from loratools.model.finite import check_tensors

    def read(t: torch.Tensor) -> torch.Tensor:
        found = sources.source(t) if t.is_meta else None
        if found is None:
            return t
        path, info = found
        scan = scan_tensor(path, info)
        if scan.first_nonfinite is not None:
            raise NumericError(
                f"{where}: tensor {info.name} holds NaN/Inf values (first at index {scan.index()}: "
                f"{scan.value})",
                hint="the training run diverged or the file is damaged; nothing was written",
                path=where,
            )
        import torch

        return torch.zeros((), dtype=t.dtype)  # scanned: finite

    check_tensors(adapter, where, read=read)


def all_zero(t: torch.Tensor, adapter: Adapter) -> bool:
    """``not t.any()``, scanning a placeholder of :func:`load_streamed` in chunks."""
    sources: Any = adapter.meta.get("lazy_sources")
    found = sources.source(t) if sources is not None and t.is_meta else None
    if found is None:
        return not bool(t.any())
    from loratools.files.tensor_scan import scan_tensor

    return not scan_tensor(*found).any_nonzero


def has_placeholders(adapter: Adapter) -> bool:
    from loratools.model.adapter import module_tensors

    return any(t.is_meta for m in adapter.modules.values() for t in module_tensors(m).values())
