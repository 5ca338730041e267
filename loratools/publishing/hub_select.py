"""Which files of a Hub repository a command needs, decided from the repository's file list.

Pure functions over names (no network), so the same choice is made online (from the Hub's listing) and
offline (from the cached snapshot). Only one weight format comes: ``.safetensors`` when a folder has it,
``.bin`` only when it has none; diffusers variants (``*.fp16.safetensors``) only when no plain file exists.
"""

from __future__ import annotations

from collections.abc import Iterable

from loratools.errors import InputNotFoundError, UnsafeInputError, UsageError, name_list

ADAPTER_CONFIG = "adapter_config.json"
#: small files a base checkpoint folder carries besides weights: configs, index and tokenizer files
_SIDE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
_OTHER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".tflite", ".ot")
_BIN_PREFIXES = ("pytorch_model", "diffusion_pytorch_model", "model", "adapter_model", "pytorch_lora_weights")


def check_names(names: Iterable[str], label: str) -> None:
    """Refuse a listing with names that would leave the download folder (absolute, ``..``, backslashes)."""
    for name in names:
        parts = name.split("/")
        if not name or name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
            raise UnsafeInputError(
                f"{label}: the repository lists a file named {name!r}, which would leave the download folder",
                hint="this is not a well-formed Hub repository; do not use it",
            )


def _children(names: list[str], folder: str) -> tuple[list[str], set[str]]:
    """Files directly in ``folder`` (full names) and the names of its subfolders."""
    prefix = f"{folder}/" if folder else ""
    files, subs = [], set()
    for n in names:
        if not n.startswith(prefix):
            continue
        rest = n[len(prefix) :]
        if "/" in rest:
            subs.add(rest.split("/", 1)[0])
        else:
            files.append(n)
    return sorted(files), subs


def _base(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _plain(name: str, suffix: str) -> bool:
    """``model.safetensors`` / ``model-00001-of-00002.safetensors``, not a variant like ``model.fp16.safetensors``."""
    stem = _base(name)[: -len(suffix)]
    return "." not in stem


def choose_weights(files: list[str]) -> list[str]:
    """The weight files of one folder: safetensors if any (plain before variants), else ``.bin`` weights."""
    for suffix in (".safetensors", ".bin"):
        found = [f for f in files if f.endswith(suffix)]
        if suffix == ".bin":
            found = [f for f in found if _base(f).startswith(_BIN_PREFIXES)]
        if found:
            plain = [f for f in found if _plain(f, suffix)]
            return plain or found
    return []


def _side_files(files: list[str]) -> list[str]:
    return [f for f in files if f.endswith(_SIDE_SUFFIXES) and not f.endswith(".bin.index.json")]


def _adapter_files(files: list[str], label: str) -> list[str]:
    names = {_base(f): f for f in files}
    readme = [names["README.md"]] if "README.md" in names else []
    if ADAPTER_CONFIG in names:
        for weights in ("adapter_model.safetensors", "adapter_model.bin"):
            if weights in names:
                return [names[ADAPTER_CONFIG], names[weights], *readme]
        raise InputNotFoundError(
            f"{label}: has {ADAPTER_CONFIG} but no adapter_model.safetensors or adapter_model.bin",
            hint="the repository is incomplete; ask its author or pick another revision",
        )
    for single in ("pytorch_lora_weights.safetensors",):
        if single in names:
            return [names[single], *readme]
    tensors = [f for f in files if f.endswith((".safetensors", ".onnx_adapter"))]
    if len(tensors) == 1:
        return [tensors[0], *readme]
    if len(tensors) > 1:
        listed = name_list([_base(t) for t in tensors], 6)
        ref = label if label.startswith("hf://") else f"hf://{label}"
        raise UsageError(
            f"{label}: holds {len(tensors)} weight files ({listed}); which one is the adapter?",
            hint=f"name one, e.g. {ref.rstrip('/')}/{_base(tensors[0])}",
        )
    bins = [f for f in files if _base(f) in ("pytorch_lora_weights.bin", "adapter_model.bin")]
    if bins:
        return [bins[0], *readme]
    return []


def select_files(names: list[str], path_in_repo: str, purpose: str, label: str) -> list[str]:
    """The repository files (full names) that ``purpose`` needs below ``path_in_repo``.

    ``purpose``: "adapter"; anything mentioning "onnx" (an ONNX export: ``*.onnx`` and its external data);
    anything else is a base checkpoint (configs, tokenizer, one weight format, a diffusers pipeline's
    components). A ``path_in_repo`` naming a file selects that file alone.
    """
    path = path_in_repo.strip("/")
    if path and path in names:
        return [path]
    files, subs = _children(names, path)
    if path and not files and not subs:
        raise InputNotFoundError(
            f"{label}: the repository has no file or folder {path!r}",
            hint="check the path after the repository name (names are case-sensitive)",
        )
    kind = purpose.lower()
    if "adapter" in kind:
        chosen = _adapter_files(files, label)
        what = "adapter (adapter_config.json + adapter_model.safetensors, or one .safetensors file)"
    elif "onnx" in kind:
        chosen = _onnx_files(files)
        what = "ONNX model (*.onnx)"
    else:
        chosen = _checkpoint_files(names, files, subs, path)
        what = "model weights (*.safetensors or pytorch_model*.bin, or a diffusers model_index.json)"
    if not chosen:
        nested = sorted(s for s in subs if any(n.startswith(f"{path}/{s}/" if path else f"{s}/") for n in names))
        hint = f"is it in a subfolder? e.g. {label.rstrip('/')}/{nested[0]}" if nested else None
        raise InputNotFoundError(f"{label}: no {what} found", hint=hint or "check that this is the right repository")
    return chosen


def _checkpoint_files(names: list[str], files: list[str], subs: set[str], path: str) -> list[str]:
    bases = {_base(f) for f in files}
    if "model_index.json" in bases:  # a diffusers pipeline: every component folder
        chosen = [f for f in files if _base(f) == "model_index.json"]
        for sub in sorted(subs):
            sub_files, _ = _children(names, f"{path}/{sub}" if path else sub)
            chosen += _side_files(sub_files) + choose_weights(sub_files)
        return chosen
    weights = choose_weights(files)
    if not weights:
        return _onnx_files(files)
    return _side_files(files) + weights


def _onnx_files(files: list[str]) -> list[str]:
    graphs = [f for f in files if f.endswith(".onnx")]
    if not graphs:
        return []
    # external data may have any name (even .bin): take everything but other frameworks' weights
    return [f for f in files if f in graphs or not (_foreign(f) or _base(f) == "README.md")]


def _foreign(name: str) -> bool:
    if name.endswith(".bin"):
        return _base(name).startswith((*_BIN_PREFIXES, "training_args", "optimizer", "scheduler", "rng_state"))
    return name.endswith(_OTHER_WEIGHTS)
