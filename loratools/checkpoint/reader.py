"""Lazy, validated readers over base checkpoints, one tensor at a time.

Supported: a Hugging Face folder (``model.safetensors``, sharded with ``model.safetensors.index.json``,
or ``pytorch_model.bin`` / sharded ``.bin`` read with ``weights_only``), a single ``.safetensors`` file,
and a diffusers pipeline folder (``model_index.json``; keys are prefixed with the component name:
``unet.down_blocks.0...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, InputNotFoundError, UnsafeInputError
from loratools.files.json_file import read_json
from loratools.files.pickle_file import load_pickle_weights
from loratools.files.safetensors_file import DTYPES, SafetensorsFile, TensorInfo

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
#: per component, the weight file names diffusers uses
COMPONENT_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


@dataclass(frozen=True)
class _BinInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class _BinFile:
    """A ``.bin`` shard with the SafetensorsFile interface (loaded whole: pickles cannot be read lazily)."""

    def __init__(self, path: Path) -> None:
        from loratools.files.safetensors_file import dtype_name

        self.path = path
        self._tensors = load_pickle_weights(path)
        self.metadata: dict[str, str] = {}
        self.tensors = {
            k: _BinInfo(k, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size())
            for k, t in self._tensors.items()
        }

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> Any:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()

    def close(self) -> None:
        self._tensors.clear()


class CheckpointReader:
    """Tensors of a base checkpoint by name, read lazily from their shard.

    ``files`` lists the weight files in order; ``file_of(key)`` the file a tensor lives in; ``config``
    the ``config.json`` (or None); ``components`` the sub-readers of a diffusers pipeline. A quantized
    base (``quantization_config``) has ``quant`` set: its companion tensors are hidden and each quantized
    module's ``.weight`` reads dequantized (``raw_weight_map`` lists the tensors as stored).
    """

    quant: Any = None

    def __init__(self, root: Path, files: list[Path], weight_map: dict[str, Path] | None = None) -> None:
        self.root = root
        self.files = files
        self._open: dict[Path, Any] = {}
        self.kind = "file" if root.is_file() else "folder"
        self.components: dict[str, CheckpointReader] = {}
        self.index: dict[str, Any] | None = None
        if weight_map is None:
            weight_map = {}
            for f in files:
                for k in self._file(f).keys():
                    weight_map[k] = f
        self.weight_map = weight_map
        cfg = root / "config.json" if root.is_dir() else None
        # a config.json that is there but no file (a dangling link, a folder) is refused, not taken as absent
        present = cfg is not None and (cfg.exists() or cfg.is_symlink())
        self.config: dict[str, Any] | None = read_json(cfg, "config") if cfg and present else None
        if self.config is not None and not isinstance(self.config, dict):
            raise FormatError(f"{cfg}: expected a JSON object", path=cfg)
        self.raw_weight_map = weight_map
        configured = self.config and any(
            isinstance(self.config.get(k), dict) for k in ("quantization_config", "quantization")
        )
        # no config.json: a ComfyUI fp8-scaled file says it by its tensor names (the scaled_fp8 marker)
        if configured or self.config is None and any(k.endswith(("scaled_fp8", ".scale_weight")) for k in weight_map):
            from loratools.checkpoint.quant import attach  # quantized modules read as one dequantized weight each

            self.quant = attach(self)
            if self.quant is not None:
                self.weight_map = self.quant.logical_weight_map(weight_map)

    # -- construction ------------------------------------------------------------------------
    def _file(self, path: Path) -> Any:
        if path not in self._open:
            self._open[path] = SafetensorsFile(path) if path.suffix == ".safetensors" else _BinFile(path)
        return self._open[path]

    # -- queries -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self.weight_map

    def tensor_key(self, module: str, suffix: str = "weight") -> str | None:
        """The key of tensor ``suffix`` of ``module`` in this checkpoint (wrapper prefixes and other
        layouts resolved, see :class:`~loratools.checkpoint.keymap.KeyMatcher`), or None."""
        if getattr(self, "_matcher", None) is None:
            from loratools.checkpoint.keymap import KeyMatcher

            self._matcher = KeyMatcher(self.keys())
        return self._matcher.tensor_key(module, suffix)

    def file_of(self, key: str) -> Path:
        try:
            return self.weight_map[key]
        except KeyError:
            raise FormatError(f"{self.root}: no tensor named {key!r}", path=self.root) from None

    def info(self, key: str) -> TensorInfo | _BinInfo:
        if self.quant is not None and key in self.quant.tensors:
            return self.quant.info(key)  # type: ignore[return-value]
        return self._file(self.file_of(key)).info(key)

    def get(self, key: str) -> torch.Tensor:
        if self.quant is not None and key in self.quant.tensors:
            return self.quant.get(key)
        return self._file(self.file_of(key)).get(key)

    def metadata(self, path: Path) -> dict[str, str]:
        return dict(self._file(path).metadata)

    def keys_in(self, path: Path) -> list[str]:
        return [k for k, f in self.weight_map.items() if f == path]

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def tie_word_embeddings(self) -> bool:
        from loratools.model.tied import config_ties  # a missing key is the architecture's default

        return config_ties(self.config)

    @property
    def quantization(self) -> str | None:
        """A description of the base's quantization, or None for a plain float checkpoint."""
        cfg = self.config or {}
        q = cfg.get("quantization_config")
        if q and not isinstance(q, dict):
            return str(q)
        if q:
            return str(q.get("quant_method") or q.get("load_in_4bit") and "bitsandbytes-4bit" or "quantized")
        for key in self.keys():
            if key.endswith((".qweight", ".SCB", ".absmax", ".quant_state", ".qzeros", ".scales")):
                return f"packed weights ({key.rsplit('.', 1)[-1]})"
        return None

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
        for c in self.components.values():
            c.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PipelineReader(CheckpointReader):
    """A diffusers pipeline folder: component readers, keys prefixed ``<component>.``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kind = "pipeline"
        self.index = read_json(root / "model_index.json", "model_index.json")
        self.config = None
        self._open = {}
        self.components = {}
        for name in sorted(self.index if isinstance(self.index, dict) else {}):
            sub = root / name
            if name.startswith("_") or not sub.is_dir():
                continue
            try:
                self.components[name] = _open_folder(sub)
            except FormatError:  # scheduler, tokenizer: no weights; a component with damaged weights is refused
                if any(sub.glob("*.safetensors")) or any(sub.glob("*.bin")) or any(sub.glob("*.index.json")):
                    raise
                continue
        self.files = [f for c in self.components.values() for f in c.files]
        self.weight_map = {f"{n}.{k}": c.file_of(k) for n, c in self.components.items() for k in c.keys()}

    def _split(self, key: str) -> tuple[CheckpointReader, str]:
        comp, _, rest = key.partition(".")
        if comp not in self.components:
            raise FormatError(f"{self.root}: no component {comp!r} for tensor {key!r}", path=self.root)
        return self.components[comp], rest

    def info(self, key: str) -> TensorInfo | _BinInfo:
        c, k = self._split(key)
        return c.info(k)

    def get(self, key: str) -> torch.Tensor:
        c, k = self._split(key)
        return c.get(k)

    def metadata(self, path: Path) -> dict[str, str]:
        for c in self.components.values():
            if path in c.files:
                return c.metadata(path)
        return {}


def _open_folder(root: Path) -> CheckpointReader:
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX, "diffusion_pytorch_model.safetensors.index.json"):
        index_path = root / index_name
        if index_path.is_file():
            index = read_json(index_path, "index")
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict):
                raise FormatError(f"{index_path}: has no weight_map", path=index_path)
            weight_map: dict[str, Path] = {}
            for key, fname in wm.items():
                if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith("."):
                    raise UnsafeInputError(f"{index_path}: shard name {fname!r} for {key!r} leaves the folder")
                shard = root / fname
                if not shard.is_file():
                    raise InputNotFoundError(f"{index_path}: shard {fname} (for {key!r}) is missing", path=shard)
                weight_map[key] = shard
            files = sorted(set(weight_map.values()), key=lambda p: p.name)
            reader = CheckpointReader(root, files, None)
            reader.index = index
            # the index must agree with the shards' own headers
            actual = reader.raw_weight_map
            missing = sorted(set(weight_map) - set(actual))
            if missing:
                raise FormatError(f"{index_path}: lists {missing[0]!r} but no shard holds it", path=index_path)
            moved = sorted(k for k, f in weight_map.items() if actual[k] != f)  # transformers opens the listed shard
            if moved:
                k = moved[0]
                raise FormatError(
                    f"{index_path}: lists {k!r} in {weight_map[k].name}, but {actual[k].name} holds it", path=index_path
                )
            return reader
    for name in ("model.safetensors", *COMPONENT_WEIGHTS, "pytorch_model.bin", "diffusion_pytorch_model.bin"):
        if (root / name).is_file():
            return CheckpointReader(root, [root / name])
    singles = sorted(root.glob("*.safetensors"))
    if len(singles) == 1:
        return CheckpointReader(root, singles)
    raise FormatError(
        f"{root}: no model weights found (looked for {SAFETENSORS_INDEX}, model.safetensors, pytorch_model.bin)",
        hint="pass a Hugging Face model folder, a .safetensors file, or a diffusers pipeline folder",
        path=root,
    )


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a base checkpoint (folder, sharded folder, single .safetensors file, diffusers pipeline, or a GGUF
    diffusion model as ComfyUI-GGUF writes it: :mod:`loratools.checkpoint.gguf_diffusion`)."""
    from loratools.publishing.hub import resolve_path

    p = resolve_path(path, "base checkpoint")
    if p.is_file():
        if p.suffix == ".safetensors":
            return CheckpointReader(p, [p])
        if p.suffix in (".bin", ".pt", ".pth"):
            return CheckpointReader(p, [p])
        from loratools.files.gguf_file import is_gguf_file

        if is_gguf_file(p):  # a diffusion model as ComfyUI-GGUF writes it; a llama.cpp model is refused there
            from importlib import import_module

            # named, not imported: GgufDitBase subclasses CheckpointReader (an import would be a circle)
            return import_module("loratools.checkpoint.gguf_diffusion").open_gguf_checkpoint(p)
        if p.suffix == ".gguf":  # named .gguf but no GGUF magic: say so, not "expected .safetensors"
            with open(p, "rb") as f:
                head = f.read(4)
            raise FormatError(f"{p}: not a GGUF file (it starts with {head!r}, not b'GGUF')", path=p)
        raise FormatError(f"{p}: not a checkpoint (expected .safetensors or a model folder)", path=p)
    if (p / "model_index.json").is_file():
        return PipelineReader(p)
    return _open_folder(p)


__all__ = ["CheckpointReader", "PipelineReader", "open_checkpoint", "read_json", "load_pickle_weights", "DTYPES"]
