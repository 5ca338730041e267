"""What a merge records about itself: the base's files (by header digest) and the adapters, as provenance."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader


def describe_base(base: str | Path, reader: CheckpointReader) -> dict[str, Any]:
    """The base's weight files by name, size and sha256 of their safetensors header (not all bytes: speed)."""
    import hashlib

    from loratools.publishing.hub import hub_info_for
    from loratools.publishing.publish import file_digest

    hub = hub_info_for(base)  # a Hub base: its repo id and commit identify it
    if hub:
        return dict(hub)
    root = reader.root if reader.root.is_dir() else reader.root.parent
    files = []
    for f in reader.files:
        rel = f.relative_to(root).as_posix()
        if f.suffix != ".safetensors":
            files.append({**file_digest(f), "path": rel})
            continue
        with open(f, "rb") as fh:
            head = fh.read(8)
            head += fh.read(int.from_bytes(head, "little"))
        files.append({"path": rel, "size": f.stat().st_size, "sha256_header": hashlib.sha256(head).hexdigest()})
    return {"path": str(base), "files": files}


def merge_provenance(  # noqa: ANN201
    base, base_path, reader, adapters, weights, dtype, max_shard_size, include, exclude  # noqa: ANN001
):
    """The provenance metadata every merged file carries."""
    from loratools.publishing.publish import describe_input, provenance, provenance_metadata

    described = [
        describe_input(a) if isinstance(a, str | Path) else {"source": str(a.meta.get("source"))} for a in adapters
    ]
    record = provenance(
        "merge",
        {
            "weights": list(weights),
            "dtype": dtype or "auto",
            "max_shard_size": max_shard_size,
            "include": include,
            "exclude": exclude,
        },
        {"base": describe_base(base, reader), "adapters": described},
    )
    return provenance_metadata(record)
