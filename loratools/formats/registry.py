"""Format registry and detection. Formats plug in with ``@register_format``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from loratools.errors import FormatError, InputNotFoundError, UsageError

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter


class KeyResolver(Protocol):
    """What a format may know of a base checkpoint: its names, shapes and config — nothing of its files.

    ``loratools.checkpoint.reader.CheckpointReader`` is one; formats never import checkpoint code.
    """

    kind: str  # "folder" | "file" | "pipeline"
    config: dict[str, Any] | None
    components: Mapping[str, KeyResolver]

    def keys(self) -> list[str]: ...

    def info(self, key: str) -> Any: ...  # has .shape

    def get(self, key: str) -> torch.Tensor: ...

    def tensor_key(self, module: str, suffix: str = "weight") -> str | None: ...

_REGISTRY: dict[str, type[AdapterFormat]] = {}


class AdapterFormat:
    """Base class of a format. Subclasses set ``name`` and implement the three methods."""

    name: ClassVar[str] = ""
    #: what ``--help`` and errors say about the on-disk shape ("folder", "file")
    layout: ClassVar[str] = "folder"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """True when ``path`` looks like this format (cheap: names and headers only)."""
        raise NotImplementedError

    @classmethod
    def read(cls, path: Path, base: KeyResolver | None = None) -> Adapter:
        """Read ``path`` into the canonical model; ``base`` resolves ambiguous names if given."""
        raise NotImplementedError

    @classmethod
    def write(cls, adapter: Adapter, path: Path, **options: Any) -> None:
        """Write ``adapter`` to ``path`` (a fresh temporary location: publishing is the caller's)."""
        raise NotImplementedError


def register_format(cls: type[AdapterFormat]) -> type[AdapterFormat]:
    """Class decorator that adds a format to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    from loratools.formats import _BUILTIN

    for name in _BUILTIN:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:  # a format module not written yet or an extra missing
            if exc.name != f"{__package__}.{name}":
                raise


def _in_priority() -> list[type[AdapterFormat]]:
    """Formats in ``_BUILTIN``'s order (a more specific layout before the one it looks like: an mlx-lm or
    vllm-moe folder before PEFT), whatever order their modules happened to be imported in; others after."""
    from loratools.formats import _BUILTIN

    rank = {f"{__package__}.{name}": i for i, name in enumerate(_BUILTIN)}
    return sorted(_REGISTRY.values(), key=lambda fmt: rank.get(fmt.__module__, len(rank)))


def list_formats() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_format(name: str) -> type[AdapterFormat]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown adapter format {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def _raise_if_broken(p: Path) -> None:
    """A damaged safetensors file (truncated, a bad header) is that, not "not a LoRA adapter": the sniffers read
    headers leniently and pass over a file they cannot parse, so its own reader's one line is raised here."""
    if p.is_dir():
        candidates = [f for f in (p / "adapter_model.safetensors", p / "adapters.safetensors") if f.is_file()]
    else:
        candidates = [p] if p.suffix.lower() == ".safetensors" else []
    from loratools.files.safetensors_file import read_header

    for f in candidates:
        read_header(f)  # raises FormatError naming the file and the field when the file is damaged


def detect_format(path: str | Path) -> type[AdapterFormat]:
    """The format of an adapter at ``path``; FormatError listing what was tried when none fits."""
    _load_builtins()
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or folder", path=p)
    for fmt in _in_priority():
        if fmt.sniff(p):
            return fmt
    if p.is_file() and p.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"):
        from loratools.errors import UnsafeInputError

        raise UnsafeInputError(
            f"{p}: a bare pickle file is not read as an adapter (unpickling can run code)",
            hint="convert it to .safetensors; a PEFT adapter_model.bin is read (weights only) inside its folder",
            path=p,
        )
    _raise_if_broken(p)
    hint = "a PEFT adapter is a folder with adapter_config.json; a kohya file is one .safetensors"
    if p.is_file() and p.suffix.lower() == ".gguf":
        hint = (
            f"{p} is a GGUF model (llama.cpp or a ComfyUI-GGUF diffusion model), not an adapter: name the adapter "
            "here; merge into the model with `loratools merge MODEL.gguf ADAPTER -o merged.gguf`; for a llama.cpp "
            "model an adapter is written with `loratools convert ADAPTER --to gguf --base MODEL.gguf -o adapter.gguf`"
        )
    if p.is_dir() and ((p / "config.json").is_file() or (p / "model_index.json").is_file()):
        hint = (
            f"{p} looks like a base model, not an adapter: name the adapter here "
            "(merge takes the model first: loratools merge MODEL ADAPTER -o OUT)"
        )
    raise FormatError(
        f"{p}: not a LoRA adapter in any known format (tried {', '.join(sorted(_REGISTRY))})", hint=hint, path=p
    )
