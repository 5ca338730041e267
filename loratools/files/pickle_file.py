"""``torch.save`` state dicts (``.bin``/``.pt``) read without running code: ``torch.load(weights_only=True)``
on the zip format only, memory-mapped. Used for adapters and base checkpoints alike."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import FormatError, UnsafeInputError

if TYPE_CHECKING:
    import torch


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin``/``.pt`` state dict through ``torch.load(weights_only=True)``: never runs code.

    Only the zip format of ``torch.save`` (PyTorch >= 1.6) is read, memory-mapped: the legacy format
    allocates whatever storage sizes its pickle declares, so it is refused like a code-running pickle.
    """
    import warnings
    import zipfile

    import torch

    hint = "loratools never runs code from pickles; convert the file to .safetensors with its author's tools"
    try:
        is_zip = zipfile.is_zipfile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not a readable torch.save archive ({exc})", path=path) from None
    if not is_zip:
        raise UnsafeInputError(
            f"{path}: refused to load: not a torch.save zip archive (a legacy or raw pickle, whose sizes "
            "cannot be checked before loading and which may run code)",
            hint=hint,
            path=path,
        )
    _check_members(path, hint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure inside torch.load of an untrusted file (even its asserts)
        raise UnsafeInputError(f"{path}: refused to load: {_pickle_reason(exc)}", hint=hint, path=path) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FormatError(f"{path}: expected a dict of tensors", path=path)
    return obj


#: the pickle of a state dict is ~150 bytes a tensor: 16 MiB is ~100k tensors; unpickling costs ~20x its size
MAX_PICKLE_BYTES = 16 * 1024 * 1024


def _check_members(path: Path, hint: str) -> None:
    """Bound the archive by its members' sizes before anything is inflated or unpickled: torch.save stores every
    member uncompressed and inside the file, with one ``data.pkl`` of modest size."""
    import zipfile

    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError, EOFError) as exc:
        raise FormatError(f"{path}: not a readable torch.save archive ({exc})", path=path) from None
    for m in members:
        if m.filename.endswith("data.pkl") and m.file_size > MAX_PICKLE_BYTES:
            raise UnsafeInputError(
                f"{path}: refused to load: member {m.filename} unpacks to {m.file_size} bytes "
                f"(limit {MAX_PICKLE_BYTES} for a state dict's pickle)",
                hint=hint,
                path=path,
            )
        if m.compress_type != zipfile.ZIP_STORED and m.file_size > MAX_PICKLE_BYTES:
            raise UnsafeInputError(
                f"{path}: refused to load: member {m.filename} is compressed and unpacks to {m.file_size} bytes "
                "(torch.save stores members uncompressed)",
                hint=hint,
                path=path,
            )
        if m.compress_type == zipfile.ZIP_STORED and m.file_size != m.compress_size or (
            m.header_offset + m.compress_size > size
        ):
            raise FormatError(
                f"{path}: not a readable torch.save archive (member {m.filename} claims {m.file_size} bytes "
                f"beyond the file's {size})",
                path=path,
            )


def _pickle_reason(exc: BaseException) -> str:
    """Why torch's weights-only unpickler refused, without torch's advice to disable the guard."""
    import re

    text = str(exc)
    found = re.search(r"(?:unsupported )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if found:
        return f"the pickle calls {found.group(1)}, which could run code; only plain tensors are read"
    if "Weights only load failed" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in lines[1:] if "weights_only" not in ln and "documentation" not in ln), "")
        return f"not a plain tensor state dict ({detail[:160] or 'the weights-only unpickler refused it'})"
    first = text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__
    return f"not a readable tensor state dict ({first[:160]})"
