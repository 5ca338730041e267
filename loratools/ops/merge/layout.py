"""Where each output tensor goes: the base's own shard names and index, or a resharded layout.

A *unit* is one set of weight files with one index: a model folder, a single file, or one component
of a diffusers pipeline. For each unit the layout lists the output files, each with its tensors in
write order (the base's byte order, so copies read sequentially) and where each tensor's bytes come
from: a byte range of a base file (copied without decoding), or a tensor to compute or cast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.checkpoint.reader import BIN_INDEX, SAFETENSORS_INDEX
from loratools.checkpoint.writer import ShardPlan, TensorEntry, plan_shards

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.ops.merge.plan import MergePlan, TensorJob

DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
INDEX_NAMES = (SAFETENSORS_INDEX, BIN_INDEX, DIFFUSERS_INDEX, "diffusion_pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Source:
    """Where a tensor's bytes come from: ``copy`` a base byte range, or ``make`` it (compute or cast)."""

    kind: str  # "copy" | "make"
    key: str  # full base key (copy / cast) or job key (compute)
    path: Path | None = None
    start: int = 0
    nbytes: int = 0
    job: TensorJob | None = None


@dataclass
class OutFile:
    rel: str
    entries: list[TensorEntry]
    sources: dict[str, Source]
    metadata: dict[str, str]


@dataclass
class Unit:
    """One rewritten set of weight files (``subdir`` relative to the output, "" for the root)."""

    subdir: str
    files: list[OutFile] = field(default_factory=list)
    index_name: str | None = None
    index_meta: dict[str, object] = field(default_factory=dict)
    consumed: set[Path] = field(default_factory=set)  # base files this unit replaces

    @property
    def shard_plan(self) -> ShardPlan:
        return ShardPlan({f.rel.rsplit("/", 1)[-1]: f.entries for f in self.files})


def out_name(path: Path) -> str:
    """Output file name for a base weight file: ``.bin`` becomes ``.safetensors`` (``pytorch_model`` -> ``model``)."""
    name = path.name
    if path.suffix == ".safetensors":
        return name
    stem = name[: -len(path.suffix)]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return stem + ".safetensors"


def _ordered_keys(reader: CheckpointReader, f: Path) -> list[str]:
    keys = reader.keys_in(f)
    infos = {k: reader.info(k) for k in keys}
    if all(hasattr(i, "start") for i in infos.values()):
        return sorted(keys, key=lambda k: infos[k].start)
    return keys


def layout_unit(
    reader: CheckpointReader,
    plan: MergePlan,
    *,
    prefix: str = "",
    subdir: str = "",
    out_dtype: str | None = None,
    max_shard_size: int | None = None,
    metadata: dict[str, str],
    single_file: bool = False,
) -> Unit:
    """Plan the output files of one unit; ``prefix`` is the pipeline component's key prefix."""
    from loratools.files.safetensors_file import FLOAT_DTYPES

    unit = Unit(subdir=subdir, consumed=set(reader.files))
    after: dict[str, list[str]] = {}
    for new, neighbour in plan.new_keys.items():
        if new.startswith(prefix):
            after.setdefault(neighbour, []).append(new)
    groups: list[tuple[Path, list[tuple[TensorEntry, Source]]]] = []
    for f in reader.files:
        items = []
        for k in _ordered_keys(reader, f):
            full = prefix + k
            for key in (full, *sorted(after.get(full, []))):
                items.append(_item(reader, plan.jobs.get(key), key, prefix, f, out_dtype, FLOAT_DTYPES))
        groups.append((f, items))
    meta_of = {f: {**reader.metadata(f), **metadata} for f in reader.files}
    for m in meta_of.values():
        m.setdefault("format", "pt")
    if single_file:
        items = [it for _, g in groups for it in g]
        unit.files.append(_outfile("", items, meta_of[reader.files[0]]))
        return unit
    stem = "diffusion_pytorch_model" if reader.files[0].name.startswith("diffusion_pytorch_model") else "model"
    if max_shard_size:
        items = [it for _, g in groups for it in g]
        shards = plan_shards([e for e, _ in items], max_shard_size, stem)
        src = {e.name: s for e, s in items}
        for name, entries in shards.files.items():
            rel = f"{subdir}/{name}" if subdir else name
            unit.files.append(OutFile(rel, entries, {e.name: src[e.name] for e in entries}, meta_of[reader.files[0]]))
    else:
        for f, items in groups:
            rel = f"{subdir}/{out_name(f)}" if subdir else out_name(f)
            unit.files.append(_outfile(rel, items, meta_of[f]))
    if len(unit.files) > 1 or reader.index is not None:
        unit.index_name = f"{stem}.safetensors.index.json"
        idx_meta = (reader.index or {}).get("metadata") if isinstance(reader.index, dict) else None
        unit.index_meta = {k: v for k, v in (idx_meta or {}).items() if k != "total_size"}
    return unit


def _outfile(rel: str, items: list[tuple[TensorEntry, Source]], metadata: dict[str, str]) -> OutFile:
    return OutFile(rel, [e for e, _ in items], {e.name: s for e, s in items}, metadata)


def _item(
    reader: CheckpointReader,
    job: TensorJob | None,
    key: str,
    prefix: str,
    f: Path,
    out_dtype: str | None,
    floats: frozenset[str],
) -> tuple[TensorEntry, Source]:
    name = key[len(prefix) :]
    if job is not None and not job.is_copy:
        dtype = out_dtype if out_dtype and job.dtype in floats else job.dtype
        return TensorEntry(name, dtype, job.shape), Source("make", key, job=job)
    src_key = job.source if job is not None and job.source else key
    info = reader.info(src_key[len(prefix) :])
    dtype = out_dtype if out_dtype and info.dtype in floats else info.dtype
    entry = TensorEntry(name, dtype, tuple(info.shape))
    if dtype == info.dtype and hasattr(info, "start"):
        path = reader.file_of(src_key[len(prefix) :])
        return entry, Source("copy", src_key, path=path, start=info.start, nbytes=info.nbytes)
    return entry, Source("make", src_key)
