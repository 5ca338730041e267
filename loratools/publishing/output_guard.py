"""What ``--overwrite`` may replace: never a place a person works in, only a previous loratools output.

``-o . --overwrite`` once deleted a user's project. An existing output folder is replaced only when its
own files prove that one loratools run wrote it: every weight file in it carries the same provenance
record (safetensors metadata, ONNX metadata_props), or is a copy whose digest that record lists (a
pipeline component no adapter touched is copied whole). The working directory, the home folder, their
ancestors and any folder holding an input are refused whatever they hold; so is a folder that merely
holds some of our single-file outputs (``~/models`` with a kohya file we wrote): the weight files of a
folder output sit beside its config (adapter_config.json, config.json, an index) or have its fixed name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: files that hold weights in some framework; ONNX external data belongs to its .onnx file
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".onnx_adapter", ".h5", ".msgpack",
    ".npz", ".pb", ".tflite",
)  # fmt: skip
_LISTED = 8
#: a weight file of a folder output sits beside one of these (or has one of the fixed names below)
_FOLDER_MARKS = ("adapter_config.json", "config.json")
_FOLDER_NAMES = ("pytorch_lora_weights.safetensors", "model.onnx")


def entries_summary(folder: Path) -> str:
    """'3 entries: a.json, b.safetensors, src/' — what removing ``folder`` would delete (first few)."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in folder.iterdir())
    except OSError:
        return "everything in it"
    shown = ", ".join(names[:_LISTED]) + (", …" if len(names) > _LISTED else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}" + (f": {shown}" if names else "")


def _resolved(get: Any) -> Path | None:
    try:
        return Path(get()).resolve()
    except (OSError, RuntimeError, KeyError):  # a deleted working directory, no HOME
        return None


def location_problem(out: Path) -> str | None:
    """Why the existing path ``out`` (resolved) must never be replaced: working directory, home, ancestors."""
    cwd, home = _resolved(os.getcwd), _resolved(Path.home)
    if cwd is not None and out == cwd:
        return "is the working directory"
    if home is not None and out == home:
        return "is the home folder"
    if cwd is not None and out in cwd.parents:
        return "contains the working directory"
    if home is not None and out in home.parents:
        return "contains the home folder"
    return None


#: the metadata key of the provenance record (publish.METADATA_KEY; publish imports this module)
_RECORD_KEY = "loratools"


def _record(text: object) -> dict[str, Any] | None:
    try:
        rec = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def _onnx_record(path: Path) -> dict[str, Any] | None:
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # no onnx installed, or not a model: no proof either way
        return None
    return next((_record(p.value) for p in proto.metadata_props if p.key == _RECORD_KEY), None)


def provenance_record(path: Path) -> dict[str, Any] | None:
    """The loratools provenance record a weight file carries, or None."""
    from loratools.errors import LoratoolsError

    if path.suffix == ".onnx":
        return _onnx_record(path)
    if path.suffix == ".gguf":
        return _gguf_record(path)
    if path.suffix != ".safetensors":
        return None
    from loratools.files.safetensors_file import read_header

    try:
        return _record((read_header(path)[1] or {}).get(_RECORD_KEY))
    except (LoratoolsError, OSError, ValueError):
        return None


_DIGEST_KINDS = ("sha256", "sha256_first_mib", "sha256_header")


def _listed_digests(record: Any) -> set[tuple[int, str, str]]:
    """Every (size, kind, digest) of an input file the record describes (its inputs' file entries)."""
    found: set[tuple[int, str, str]] = set()
    stack = [record]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for kind in _DIGEST_KINDS:
                if isinstance(item.get("size"), int) and isinstance(item.get(kind), str):
                    found.add((item["size"], kind, item[kind]))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _digest(path: Path, kind: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        if kind == "sha256_header":  # a safetensors file's 8-byte length and JSON header
            head = f.read(8)
            h.update(head + f.read(min(int.from_bytes(head, "little"), 1 << 27)))
        elif kind == "sha256_first_mib":
            h.update(f.read(1 << 20))
        else:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # only files up to publish.HASH_LIMIT are listed so
                h.update(chunk)
    return h.hexdigest()


def _is_listed(path: Path, listed: set[tuple[int, str, str]]) -> bool:
    size = path.stat().st_size
    return any(s == size and _digest(path, kind) == digest for s, kind, digest in listed)


def previous_output_problem(folder: str | Path) -> str | None:
    """None when ``folder`` is provably one loratools output; else why not (naming a file)."""
    root = Path(folder)
    weights: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if ".git" in dirnames or ".git" in filenames:
            return "it holds a .git folder"
        weights += [Path(dirpath) / n for n in sorted(filenames) if n.endswith(WEIGHT_SUFFIXES)]
    records = {p: provenance_record(p) for p in sorted(weights)}
    proven = {p: r for p, r in records.items() if r is not None}
    if not proven:
        first = next(iter(records), None)
        if first is None:
            return "no weight file in it carries loratools provenance"
        return f"{first.relative_to(root)} has no loratools provenance"
    (first, record), *others = proven.items()
    for p, r in others:
        if r != record:
            return f"{first.relative_to(root)} and {p.relative_to(root)} come from different loratools runs"
    for p in proven:
        if p.name not in _FOLDER_NAMES and not any((p.parent / m).is_file() for m in _FOLDER_MARKS):
            if not any(q.name.endswith(".index.json") for q in p.parent.iterdir()):
                return f"{p.relative_to(root)} is a single-file output of ours, not part of an output folder"
    listed = _listed_digests(record.get("inputs"))
    for p in records:
        if p not in proven and not _is_listed(p, listed):
            return f"{p.relative_to(root)} has no loratools provenance"
    return None


#: the GGUF metadata key of the record (adapters and merged GGUF models)
GGUF_RECORD_KEY = "loratools.provenance"
#: the line of a text output (an Ollama Modelfile) that carries the record: ``# loratools {json}``
TEXT_RECORD_PREFIX = "# loratools "


def _gguf_record(path: Path) -> dict[str, Any] | None:
    from loratools.errors import LoratoolsError
    from loratools.files.gguf_file import open_gguf_file

    try:
        return _record(open_gguf_file(path).scalar(GGUF_RECORD_KEY))
    except (LoratoolsError, OSError, ValueError):
        return None


def png_record(path: Path) -> dict[str, Any] | None:
    """The record in a PNG's ``loratools`` tEXt chunk (spectrum --plot writes one), or None."""
    import struct
    import zlib

    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            for _ in range(64):  # the text chunks matplotlib writes come before the image data
                head = f.read(8)
                if len(head) < 8:
                    return None
                size, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND") or size > 1 << 20:
                    return None
                body = f.read(size)
                f.read(4)  # CRC
                key, _, text = body.partition(b"\0")
                if kind == b"tEXt" and key == _RECORD_KEY.encode():
                    return _record(text.decode("latin-1"))
                if kind == b"zTXt" and key == _RECORD_KEY.encode():
                    return _record(zlib.decompress(text[1:]).decode("latin-1"))
    except (OSError, struct.error, zlib.error):
        return None
    return None


def _text_record(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > 1 << 20:
            return None
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return next((_record(ln[len(TEXT_RECORD_PREFIX) :]) for ln in lines if ln.startswith(TEXT_RECORD_PREFIX)), None)


def _is_slot_adapter(path: Path) -> bool:
    """An onnxruntime adapter file holding LoRA slot tensors only (the format has no metadata to prove
    who wrote it: what --overwrite may lose is at most another LoRA adapter of the same kind)."""
    try:
        import onnxruntime as ort

        names = list(ort.AdapterFormat.read_adapter(str(path)).get_parameters())
    except Exception:  # not installed, or not such a file: no proof
        return False
    return bool(names) and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)


def previous_file_problem(path: Path) -> str | None:
    """None when the single file ``path`` is provably a loratools output; else why not.

    Ours: a safetensors, GGUF or ONNX file whose metadata holds our provenance record, a PNG or text file
    (Ollama Modelfile) carrying it, an ``.onnx_adapter`` of LoRA slot tensors only (that format has no
    metadata). A transformers ``model.safetensors``, a LyCORIS file we did not write, ``notes.txt`` are not.
    """
    if not path.is_file():
        return "it is not a regular file"
    if path.suffix == ".onnx_adapter":
        return None if _is_slot_adapter(path) else "it is not an onnxruntime LoRA adapter file"
    if path.suffix in (".safetensors", ".gguf", ".onnx"):
        kind = {".safetensors": "safetensors file", ".gguf": "GGUF file", ".onnx": "ONNX model"}[path.suffix]
        return None if provenance_record(path) is not None else f"this {kind} has no loratools provenance"
    if path.suffix == ".png":
        return None if png_record(path) is not None else "this PNG has no loratools provenance"
    if _text_record(path) is not None:
        return None
    return "it carries no loratools provenance record"
