"""Loading and saving adapters through the format registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .formats.registry import detect_format, get_format
from .publish import atomic_output

if TYPE_CHECKING:
    import torch

    from .adapter import Adapter
    from .checkpoint.reader import CheckpointReader


def resolve_path(spec: str | Path, purpose: str = "adapter") -> Path:
    """A local path for ``spec``: a path as given, or an ``hf://`` / ``ORG/NAME`` Hub reference."""
    from .hub import resolve_input

    return resolve_input(spec, purpose)


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
    check_tensors(adapter, _weights_label(adapter, local))
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
    _check_output_shape(fmt.name, fmt.layout, path)
    check_tensors(adapter, f"the output {path}")
    with atomic_output(path, overwrite=overwrite, inputs=inputs, directory=fmt.layout == "folder") as tmp:
        fmt.write(adapter, tmp, provenance=provenance, **options)
    return Path(path)


_FILE_SUFFIXES = (".safetensors", ".bin", ".onnx_adapter", ".pt")


def _check_output_shape(name: str, layout: str, path: str | Path) -> None:
    """Refuse a folder-looking path for a one-file format and a file-looking path for a folder format."""
    from .errors import UsageError

    text = str(path)
    if layout == "file" and (text.endswith(("/", "\\")) or Path(path).is_dir()):
        raise UsageError(
            f"{path}: the {name} format writes one file, but this is a folder path",
            hint="name the file, e.g. -o out.safetensors",
        )
    if layout == "folder" and Path(path).suffix in _FILE_SUFFIXES:
        raise UsageError(
            f"{path}: the {name} format writes a folder, but this names a {Path(path).suffix} file",
            hint="give a folder name (e.g. -o out/), or choose a one-file format with --to",
        )


def first_nonfinite(t: torch.Tensor) -> list[int] | None:
    """The index of the first NaN/Inf entry of a float tensor, or None when all are finite."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return None
    x = t if t.element_size() > 1 else t.float()  # isfinite has no fp8 kernels
    if bool(torch.isfinite(x).all()):
        return None
    return [int(i) for i in (~torch.isfinite(x)).nonzero()[0].tolist()]


def require_finite(t: torch.Tensor, tensor: str, where: str | Path, *, hint: str | None = None) -> None:
    """Raise :class:`NumericError` naming ``where`` (a file), ``tensor`` and the first NaN/Inf index."""
    from .errors import NumericError

    first = first_nonfinite(t)
    if first is not None:
        x = t if t.element_size() > 1 else t.float()
        raise NumericError(
            f"{where}: tensor {tensor} holds NaN/Inf values (first at index {first}: {float(x[tuple(first)])})",
            hint=hint or "the training run diverged or the file is damaged; nothing was written",
            path=where,
        )


def check_tensors(
    adapter: Adapter, where: str | Path, read: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """Refuse non-float LoRA tensors and NaN/Inf anywhere in ``adapter``, naming ``where`` and the tensor.

    ``read`` turns a stored tensor into its values (merge passes one that reads data-less placeholders
    back from the file, so only one tensor is in memory at a time).
    """
    from .errors import ValidationError

    read = read or (lambda t: t)
    for name, m in adapter.modules.items():
        for role, t in (("lora_A", m.down), ("lora_B", m.up), ("magnitude", m.magnitude), ("bias", m.bias)):
            if t is None:
                continue
            if not t.is_floating_point():
                dtype = str(t.dtype).removeprefix("torch.")
                raise ValidationError(
                    f"{where}: tensor {name}.{role} is {dtype}; LoRA tensors must be floating point",
                    hint="the file is damaged or not a LoRA adapter; re-export it from its training tool",
                    path=where,
                )
            require_finite(read(t), f"{name}.{role}", where)
    for key, t in adapter.replacements.items():
        require_finite(read(t), key, where)


def _weights_label(adapter: Adapter, local: Path) -> str:
    files = [f for f in adapter.meta.get("files") or [] if not str(f).endswith(".json")]
    return str(files[0]) if len(files) == 1 else str(local)
