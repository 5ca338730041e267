"""mlx-lm adapters (Apple's MLX): ``adapters.safetensors`` + ``adapter_config.json``.

The rules, from mlx-lm 0.32's ``tuner/lora.py``, ``tuner/dora.py`` and ``tuner/utils.py``:

- ``fine_tune_type`` ``lora`` (the default) or ``dora``; ``full`` is a fine-tuned checkpoint, not an adapter.
- ``lora_parameters``: ``rank``, ``scale`` and ``dropout`` are all required (``linear_to_lora_layers``); ``keys``
  are module paths inside each block (``self_attn.q_proj``), also matched against whole-model paths (``lm_head``);
  no ``keys`` means every Linear/Embedding of the chosen blocks. ``num_layers``: the last N blocks (-1 and 0: all).
- Tensors ``<module path>.lora_a`` ``(in, r)`` and ``.lora_b`` ``(r, out)`` — PEFT's A and B transposed — and DoRA's
  ``.m`` ``(out)``; an embedding's ``lora_a`` is ``(num_embeddings, r)``. The forward is
  ``y = Wx + scale·((x @ lora_a) @ lora_b)``: ``scale`` is a raw multiplier, so PEFT's alpha = scale·r.
- One rank and one scale per adapter, and ``load_adapters`` refuses a tensor whose shape differs from the layer it
  builds: modules of other ranks are written zero-padded to the largest rank, other scales folded into B (both exact).
- PEFT's saved base layer of an adapted embedding (``…base_layer.weight``, the base's own weight, same vocabulary)
  is not written: mlx-lm adapts the model's own embedding. A trained full tensor (``modules_to_save``) is refused.
- ``LoRASwitchLinear`` (MoE experts: ``lora_a`` ``(E, r, in)``, ``lora_b`` ``(E, out, r)``) is refused for now.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, UnsupportedError
from loratools.formats.registry import AdapterFormat, register_format
from loratools.model.adapter import Adapter, LoraModule

if TYPE_CHECKING:
    import torch

    from loratools.formats.registry import KeyResolver

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
TYPES = ("lora", "dora")
ROLES = {"lora_a": "a", "lora_b": "b", "m": "m"}
#: last path component of embedding modules (an MLX embedding LoRA has the linear shapes: the name tells)
EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


def _number(value: Any, field: str, cfg: Path, *, integer: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and (not float(value).is_integer() or value < 1)):
        want = "a positive integer" if integer else "a finite number"
        raise FormatError(f"{cfg}: lora_parameters.{field} is {value!r}, not {want}", path=cfg)
    return float(value)


def _config(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    from loratools.files.json_file import read_json

    cfg_path = path / CONFIG
    cfg = read_json(cfg_path, "adapter config")
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object", path=cfg_path)
    kind = cfg.get("fine_tune_type", "lora")
    if kind == "full":
        raise UnsupportedError(
            f"{cfg_path}: fine_tune_type 'full' is a fully fine-tuned model, not an adapter",
            hint="use the fine-tuned weights as a base checkpoint, or `loratools extract BASE TUNED` for a LoRA",
            path=cfg_path,
        )
    if kind not in TYPES:
        raise FormatError(f"{cfg_path}: fine_tune_type {kind!r} is not one of lora, dora, full", path=cfg_path)
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict):
        raise FormatError(f"{cfg_path}: lora_parameters is missing or not an object", path=cfg_path)
    for field in ("rank", "scale", "dropout"):  # mlx-lm requires all three
        if field not in params:
            raise FormatError(f"{cfg_path}: lora_parameters.{field} is missing (mlx-lm requires it)", path=cfg_path)
    _number(params["rank"], "rank", cfg_path, integer=True)
    _number(params["scale"], "scale", cfg_path)
    _number(params["dropout"], "dropout", cfg_path)
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise FormatError(f"{cfg_path}: lora_parameters.keys must be a list of module paths", path=cfg_path)
    layers = cfg.get("num_layers", 16)
    if not isinstance(layers, int) or isinstance(layers, bool):
        raise FormatError(f"{cfg_path}: num_layers is {layers!r}, not an integer", path=cfg_path)
    return kind, params, cfg


def _module(name: str, parts: dict[str, torch.Tensor], rank: int, scale: float, dora: bool, file: Path) -> LoraModule:
    from loratools.model.finite import require_finite

    for role in ("a", "b"):
        if role not in parts:
            other = "b" if role == "a" else "a"
            raise FormatError(f"{file}: {name}.lora_{role} is missing (its lora_{other} is there)", path=file)
    a, b = parts["a"], parts["b"]
    if a.ndim == 3 or b.ndim == 3:
        raise UnsupportedError(
            f"{file}: {name}.lora_a {tuple(a.shape)} is an MLX expert LoRA (LoRASwitchLinear), not read yet",
            hint="fuse it with mlx-lm (mlx_lm.fuse) and use the fused model as the base",
            path=file,
        )
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise FormatError(
            f"{file}: {name}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} are not (in, r) and (r, out)",
            path=file,
        )
    if a.shape[1] != rank:
        raise FormatError(
            f"{file}: {name}.lora_a has rank {a.shape[1]} but lora_parameters.rank is {rank} (mlx-lm would refuse "
            "to load it)",
            path=file,
        )
    for role, t in parts.items():
        tensor = f"{name}.{'lora_' + role if role != 'm' else 'm'}"
        if not t.is_floating_point():
            raise FormatError(f"{file}: tensor {tensor} is {t.dtype}, not a float tensor", path=file)
        require_finite(t, tensor, file)
    magnitude = parts.get("m")
    if dora != (magnitude is not None):
        what = "has no DoRA magnitude .m" if dora else "has a DoRA magnitude .m"
        raise FormatError(f"{file}: {name} {what} but fine_tune_type says {'dora' if dora else 'lora'}", path=file)
    kind = "embedding" if name.rsplit(".", 1)[-1] in EMBEDDINGS else "linear"
    if magnitude is not None and (kind == "embedding" or magnitude.shape != (b.shape[1],)):
        raise FormatError(
            f"{file}: {name}.m has shape {tuple(magnitude.shape)}; a DoRA magnitude of a linear layer is "
            f"({b.shape[1]},)",
            path=file,
        )
    return LoraModule(
        down=a.T.contiguous(), up=b.T.contiguous(), alpha=scale * rank, kind=kind, magnitude=magnitude
    )


def _key(module: str) -> str:
    """The ``lora_parameters.keys`` entry that selects ``module``: its path inside a block, else the whole path."""
    parts = module.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "layers" and parts[i + 1].isdigit() and i + 2 < len(parts):
            return ".".join(parts[i + 2 :])
    return module


@register_format
class MlxFormat(AdapterFormat):
    name = "mlx"
    layout = "folder"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        folder = path.parent if path.is_file() and path.name == WEIGHTS else path
        return folder.is_dir() and (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()

    @classmethod
    def read(cls, path: Path, base: KeyResolver | None = None) -> Adapter:
        from loratools.files.safetensors_file import load_file
        from loratools.publishing.publish import read_provenance

        folder = path.parent if path.is_file() else path
        kind, params, cfg = _config(folder)
        file = folder / WEIGHTS
        tensors, metadata = load_file(file)
        rank, scale = int(params["rank"]), float(params["scale"])
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            module, _, leaf = key.rpartition(".")
            if leaf not in ROLES or not module:
                raise FormatError(
                    f"{file}: tensor {key} is not an adapter parameter (lora_a, lora_b or m)",
                    hint="mlx-lm's load_adapters refuses it too",
                    path=file,
                )
            grouped.setdefault(module, {})[ROLES[leaf]] = t
        modules = {n: _module(n, p, rank, scale, kind == "dora", file) for n, p in sorted(grouped.items())}
        return Adapter(
            modules=modules,
            meta={
                "format": cls.name,
                "base_model": cfg.get("model"),
                "config": cfg,
                "metadata": metadata,
                "files": [str(file)],
                "provenance": read_provenance(metadata),
                "mlx": {"num_layers": cfg.get("num_layers", 16), "keys": params.get("keys")},
            },
        )

    @classmethod
    def write(cls, adapter: Adapter, path: Path, provenance: dict[str, Any] | None = None, **options: Any) -> None:
        import torch

        from loratools.files.safetensors_file import save_file
        from loratools.publishing.publish import provenance_metadata

        modules = _writable(adapter)
        rank = max(m.rank for m in modules.values())
        scale = Counter(m.scale for m in modules.values()).most_common(1)[0][0] or 1.0
        dora = any(m.magnitude is not None for m in modules.values())
        tensors: dict[str, torch.Tensor] = {}
        for name, m in modules.items():
            a, b = m.down.T, m.up.T
            if m.scale != scale:  # folded into B in fp32, one cast
                b = (b.float() * (m.scale / scale)).to(m.up.dtype)
            if m.rank < rank:  # zero rows/columns add nothing: exact
                a = torch.cat([a, a.new_zeros(a.shape[0], rank - m.rank)], dim=1)
                b = torch.cat([b, b.new_zeros(rank - m.rank, b.shape[1])], dim=0)
            tensors[f"{name}.lora_a"] = a.contiguous()
            tensors[f"{name}.lora_b"] = b.contiguous()
            if m.magnitude is not None:
                tensors[f"{name}.m"] = m.magnitude.contiguous()
        config = {
            "fine_tune_type": "dora" if dora else "lora",
            "num_layers": -1,  # every block: a module the adapter does not touch keeps lora_b = 0 (no change)
            "lora_parameters": {
                "rank": rank,
                "scale": scale,
                "dropout": 0.0,
                "keys": sorted({_key(n) for n in modules}),
            },
        }
        if adapter.base_model:
            config["model"] = adapter.base_model
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / WEIGHTS, metadata=provenance_metadata(provenance) if provenance else None)
        (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _writable(adapter: Adapter) -> dict[str, LoraModule]:
    """The modules an mlx-lm adapter can hold; anything else is refused in one line, never dropped."""
    from loratools.model.tied import base_layer_copies

    source = adapter.meta.get("source", "the adapter")
    copies = {k for k in base_layer_copies(adapter)
              if tuple(adapter.replacements[k].shape) == adapter.modules[k.rpartition(".")[0]].weight_shape}
    trained = sorted(set(adapter.replacements) - copies)  # PEFT's saved base layer is the base's own weight
    if trained:
        first = trained[0]
        raise UnsupportedError(
            f"{source}: {first} is a full tensor (modules_to_save); an mlx-lm adapter holds LoRA factors only",
            hint="merge the adapter (loratools merge), or lower it first: loratools convert ADAPTER --to mlx --as-lora "
            "--base BASE -o OUT",
        )
    if adapter.meta.get("trainable_tokens"):
        raise UnsupportedError(
            f"{source}: trainable tokens cannot be held by an mlx-lm adapter",
            hint="lower them to LoRA first: loratools convert ADAPTER --to mlx --as-lora --base BASE -o OUT",
        )
    out: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        why = None
        if not isinstance(m, LoraModule):
            why = f"a {m.label} module (mlx-lm has LoRA and DoRA only)"
        elif m.kind == "conv":
            why = "a conv LoRA (mlx-lm adapts Linear and Embedding layers)"
        elif m.bias is not None:
            why = "a LoRA bias (mlx-lm's LoRALinear has none)"
        elif m.fan_in_fan_out:
            why = "stored in GPT-2's transposed Conv1D layout"
        elif m.kind == "embedding" and m.magnitude is not None:
            why = "a DoRA embedding"
        elif m.kind == "embedding" and name.rsplit(".", 1)[-1] not in EMBEDDINGS:
            why = f"an embedding whose name mlx-lm's reader would take for a Linear (expected one of {EMBEDDINGS})"
        if why:
            raise UnsupportedError(
                f"{source}: module {name} is {why}",
                hint="merge the adapter instead: loratools merge BASE ADAPTER -o OUT",
            )
        if m.rank > 0:
            out[name] = m
    if not out:
        raise UnsupportedError(f"{source}: no LoRA module to write")
    dora = {m.magnitude is not None for m in out.values()}
    if len(dora) > 1:
        raise UnsupportedError(
            f"{source}: DoRA and plain LoRA modules mixed; an mlx-lm adapter is one fine_tune_type",
            hint="lower the DoRA modules first: loratools convert ADAPTER --to mlx --as-lora --base BASE -o OUT",
        )
    return out
