"""diffusers LoRA files: ``pytorch_lora_weights.safetensors`` with pipeline-component key prefixes.

Keys are PEFT's without ``base_model.model.``, prefixed with the component: ``unet.<module>.lora_A.weight``,
``text_encoder.<module>.lora_B.weight``, ``text_encoder_2.…``. Older diffusers releases wrote
``…attn1.processor.to_q_lora.down.weight``, ``…mlp.fc1.lora_linear_layer.down.weight`` and
``…conv1.lora.down.weight``; those are read too. Alpha comes from the ``lora_adapter_metadata`` JSON in the
safetensors metadata (the component's LoraConfig fields under ``<component>.``, as diffusers'
``save_lora_weights`` writes and ``load_lora_weights`` reads them), else from ``<module>.alpha`` keys; no
alpha at all means alpha = rank (scale 1), diffusers' own convention.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, UnsupportedError, UsageError, ValidationError, name_list
from loratools.files.safetensors_file import load_file, read_header, save_file
from loratools.formats.peft.config import module_pattern
from loratools.formats.peft.format import ROLES as PEFT_ROLES
from loratools.formats.peft.format import get_pattern_key
from loratools.formats.registry import AdapterFormat, register_format
from loratools.model.adapter import Adapter, LoraModule
from loratools.publishing.publish import provenance_metadata, read_provenance

if TYPE_CHECKING:
    import torch

    from loratools.formats.registry import KeyResolver

WEIGHTS = "pytorch_lora_weights.safetensors"
WEIGHTS_BIN = "pytorch_lora_weights.bin"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
_REFUSED_COMPONENTS = {"prior": "Würstchen prior", "text_encoder_3": "SD3 T5"}
#: PEFT's suffixes plus diffusers' older forms, longest first within each family
_ROLES = (
    *PEFT_ROLES,
    (".lora_A.default.weight", "down"),  # PEFT's adapter name left in (musubi-tuner's convert_lora.py can write it)
    (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
#: old attention-processor names: ``<attn>.processor.to_q_lora`` -> module under the attention
_PROCESSOR = re.compile(
    r"^(?P<attn>.*?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

#: the infix of a PEFT-wrapped transformer's names under save_lora_weights (transformer.base_model.model.X)
_PEFT_INFIX = "transformer.base_model.model."


def _weights_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in (WEIGHTS, WEIGHTS_BIN):
        if (path / name).is_file():
            return path / name
    return None


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``(component, module, role)`` of a diffusers LoRA key, or None when it is not one."""
    component, _, rest = key.partition(".")
    m = _PROCESSOR.match(rest)
    if m:
        proj = (_UNET_PROJ if component == "unet" else _TE_PROJ)[m.group("proj")]
        return component, f"{m.group('attn')}.{proj}", m.group("part")
    for suffix, role in _ROLES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if role == "alpha":  # an alpha may sit beside any of the forms above, even after .down.weight
                module = re.sub(r"\.(down|up)\.weight$", "", module)
                module = re.sub(r"\.(lora_linear_layer|lora)$", "", module)
                p = re.match(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora$", module)
                if p:
                    module = f"{p.group(1)}.{(_UNET_PROJ if component == 'unet' else _TE_PROJ)[p.group(2)]}"
            return component, module, role
    return None


def _lora_metadata(metadata: dict[str, str], where: Path) -> dict[str, dict[str, Any]]:
    raw = metadata.get(METADATA_KEY)
    if not raw:  # finetrainers writes its own key, lora_config (formats/dit/finetrainers.py)
        from loratools.formats.dit.finetrainers import transformer_config

        return transformer_config(metadata, where)
    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: {METADATA_KEY} metadata is not valid JSON ({exc})", path=where) from None
    if not isinstance(flat, dict):
        raise FormatError(f"{where}: {METADATA_KEY} metadata is not a JSON object", path=where)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _alpha(module: str, rank: int, cfg: dict[str, Any] | None, alpha_key: float | None) -> float:
    if cfg:
        pattern = cfg.get("alpha_pattern") or {}
        if not isinstance(pattern, dict):
            raise FormatError(f"{METADATA_KEY}: alpha_pattern must be an object of regex -> number")
        hit = get_pattern_key(list(pattern), module)
        if hit is not None:
            return _number(pattern[hit], f"alpha_pattern[{hit!r}]")
        value = cfg.get("lora_alpha")
        return 8.0 if value is None else _number(value, "lora_alpha")  # LoraConfig's default, as diffusers'
    if alpha_key is not None and not math.isfinite(alpha_key):
        raise FormatError(f"module {module}: its .alpha is {alpha_key}", hint="the file is damaged; re-export it")
    return float(alpha_key) if alpha_key else float(rank)


def _check_rank(weights: Path, name: str, rank: int, cfg: dict[str, Any] | None) -> None:
    """The metadata's ``r`` is the rank PEFT builds the layers with (diffusers' and finetrainers' loaders then fail
    on the tensors' shapes): a file whose tensors disagree is damaged, and its lora_alpha/r is no strength to trust.
    Not checked under a ``rank_pattern`` (its keys' matching is PEFT's to decide)."""
    if not cfg or cfg.get("rank_pattern") or "r" not in cfg or isinstance(cfg["r"], bool):
        return
    if isinstance(cfg["r"], int | float) and cfg["r"] != rank:
        raise FormatError(
            f"{weights}: module {name} has rank {rank}, but the file's metadata says r = {cfg['r']} "
            "(PEFT and diffusers refuse to load it: the metadata or the tensors were changed)",
            hint="re-save the adapter with its trainer, or remove the metadata key to read it with alpha = rank",
            path=weights,
        )


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FormatError(f"{METADATA_KEY}: {what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise FormatError(f"{METADATA_KEY}: {what} must be a finite number, got {value!r}")
    return float(value)


@register_format
class DiffusersFormat(AdapterFormat):
    name = "diffusers"
    layout = "folder"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        if path.is_dir():
            return not (path / "adapter_config.json").is_file() and _weights_file(path) is not None
        if path.suffix != ".safetensors" or not path.is_file():
            return False
        try:
            tensors, _ = read_header(path)
        except FormatError:
            return False
        known = (*COMPONENTS, *_REFUSED_COMPONENTS)
        return all(k.partition(".")[0] in known for k in tensors) and any("lora" in k for k in tensors)

    @classmethod
    def read(cls, path: Path, base: KeyResolver | None = None) -> Adapter:
        weights = _weights_file(path)
        if weights is None:
            raise FormatError(f"{path}: no {WEIGHTS} in this folder", path=path)
        if weights.suffix == ".bin":
            from loratools.files.pickle_file import load_pickle_weights

            tensors, metadata = load_pickle_weights(weights), {}
        else:
            tensors, metadata = load_file(weights)
        configs = _lora_metadata(metadata, weights)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            component = key.partition(".")[0]
            if component in _REFUSED_COMPONENTS:
                raise UnsupportedError(
                    f"{weights}: {key!r} belongs to a {_REFUSED_COMPONENTS[component]} LoRA; loratools handles "
                    "unet, text_encoder, text_encoder_2 and transformer diffusers LoRAs only for now",
                    path=weights,
                )
            split = _split_key(key)
            if split is None or split[0] not in COMPONENTS:
                raise FormatError(
                    f"{weights}: tensor {key!r} is not a diffusers LoRA tensor "
                    f"(expected {'/'.join(COMPONENTS)}.<module>.lora_A.weight and similar)",
                    path=weights,
                )
            parts.setdefault(f"{split[0]}.{split[1]}", {})[split[2]] = t
        modules: dict[str, LoraModule] = {}
        assumed: list[str] = []  # modules whose alpha the file does not store (info says so)
        zero: list[str] = []  # modules whose .alpha is 0
        for name, p in sorted(parts.items()):
            component, _, module = name.partition(".")
            emb = "down_emb" in p
            down, up = p.get("down_emb" if emb else "down"), p.get("up_emb" if emb else "up")
            if down is None or up is None:
                if set(p) == {"alpha"}:
                    continue
                raise ValidationError(f"{weights}: module {name} lacks its {'down' if down is None else 'up'} factor")
            cfg = configs.get(component)
            alpha_t = p.get("alpha")
            if alpha_t is None and cfg is None:  # diffusers' rule: alpha = rank
                assumed.append(name)
            stored = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None else None
            if stored == 0 and not cfg:
                zero.append(name)  # kohya's rule (0 means alpha = rank) is taken, and said (below)
            alpha = _alpha(module, int(down.shape[0]), cfg, stored)
            _check_rank(weights, name, int(down.shape[0]), cfg)
            kind = "embedding" if emb else ("conv" if down.ndim == 4 else "linear")
            magnitude = p.get("magnitude")
            try:
                modules[name] = LoraModule(
                    down=down,
                    up=up,
                    alpha=alpha,
                    kind=kind,
                    use_rslora=bool(cfg and cfg.get("use_rslora")),
                    magnitude=magnitude.reshape(-1) if magnitude is not None else None,
                    bias=p.get("bias"),
                )
            except ValidationError as exc:
                raise type(exc)(f"{weights}: module {name}: {exc.message}", hint=exc.hint, path=weights) from None
        from loratools.formats.alpha_values import warn_zero_alpha

        zero_alpha = warn_zero_alpha(weights, len(zero), len(modules))  # counted in the file's names
        from loratools.formats.dit.layouts import HANDLED, detect

        # the family, for info and --to kohya (PEFT-wrapped names, save_lora_weights of a get_peft_model
        # transformer, are told by their module paths as well)
        found = detect(k.replace(_PEFT_INFIX, "transformer.", 1) for k in tensors if k.startswith("transformer."))
        if found is None and base is not None:  # names Flux, SD3 and HunyuanVideo share (diffusers' SD3 trainer)
            from loratools.formats.dit.flux_io import base_dit_family
            from loratools.formats.dit.layouts import DitLayout
            from loratools.formats.dit.tables import table_for

            family = base_dit_family(base)
            names = [
                k.replace(_PEFT_INFIX, "transformer.", 1).removeprefix("transformer.")
                for k in modules
                if k.startswith("transformer.")
            ]
            if family and names and all(table_for(family).to_original(n) for n in names):
                found = DitLayout(family, "diffusers", f"transformer.{names[0]}")
        if found is not None and found.family == "ltx_cogvideo" and base is not None:  # attn1/ff only: the base tells
            from loratools.formats.dit.cogvideox import told_by_base

            found = told_by_base(found, base)
        if found is not None and found.family in HANDLED:  # named as the base names it (a BFL/Wan-AI file: renamed)
            from loratools.formats.dit.flux_io import place

            flux = {k[len("transformer.") :]: m for k, m in modules.items() if k.startswith("transformer.")}
            modules = {k: m for k, m in modules.items() if not k.startswith("transformer.")}
            modules.update(place(weights, found, None, flux, base))
        return Adapter(
            modules=modules,
            meta={
                "dit": {"family": found.family, "layout": "diffusers"} if found is not None else None,
                "format": "diffusers",
                "base_model": next((c.get("base_model_name_or_path") for c in configs.values() if c), None),
                "metadata": metadata,
                "config": configs or None,
                "provenance": read_provenance(metadata),
                "files": [str(weights)],
                "alpha_assumed": assumed,
                "alpha_zero": zero_alpha,
            },
        )

    @classmethod
    def write(cls, adapter: Adapter, path: Path, provenance: dict[str, Any] | None = None, **options: Any) -> None:
        tensors, configs = diffusers_state(adapter)
        flat = {f"{c}.{k}": v for c, cfg in configs.items() for k, v in cfg.items()}
        metadata = {"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True)}
        if provenance:
            metadata.update(provenance_metadata(provenance))
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / WEIGHTS), metadata=metadata)


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def diffusers_state(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The diffusers state dict and per-component LoraConfig fields that rebuild every module's scale."""
    from collections import Counter

    from loratools.formats.dit.format import diffusers_named

    adapter = diffusers_named(adapter)  # a Flux adapter named as an original-layout file names it: split
    if adapter.replacements:
        names = ", ".join(list(adapter.replacements)[:5])
        raise UnsupportedError(
            f"a diffusers LoRA cannot hold full replacements (modules_to_save): {names}",
            hint="write peft instead (--to peft), or leave them out: "
            "loratools convert ADAPTER --to diffusers --exclude REGEX -o OUT",
        )
    fifo = sorted(n for n, m in adapter.modules.items() if m.fan_in_fan_out)
    if fifo:  # diffusers builds its LoraConfig with fan_in_fan_out False: the update would be transposed
        raise UnsupportedError(
            f"a diffusers LoRA cannot hold fan_in_fan_out (Conv1D layout) modules: {name_list(fifo, 5)}",
            hint="write peft instead (--to peft)",
        )
    orphans = [n for n in adapter.modules if n.partition(".")[0] not in COMPONENTS or "." not in n]
    if orphans:
        raise UsageError(
            f"{len(orphans)} module(s) are not under a pipeline component ({', '.join(COMPONENTS)}): "
            + name_list(orphans, 5),
            hint="a diffusers LoRA adapts a pipeline; kohya names need --base PIPELINE to resolve them"
            if adapter.format == "kohya"
            else "a diffusers LoRA adapts a diffusers pipeline (its unet and text encoders), and these are another "
            "model's modules: write --to peft (or --to gguf for llama.cpp)",
        )
    by_component: dict[str, dict[str, LoraModule]] = {}
    for name, m in adapter.modules.items():
        component, _, module = name.partition(".")
        by_component.setdefault(component, {})[module] = m
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict[str, Any]] = {}
    for component, mods in sorted(by_component.items()):
        rslora = {m.use_rslora for m in mods.values()}
        if len(rslora) > 1:
            raise UnsupportedError(
                f"{component}: rsLoRA and plain LoRA modules cannot share one LoraConfig",
                hint="bring them to one convention first (loratools rescale --alpha), or write peft (--to peft)",
            )
        from loratools.formats.peft.config import refuse_mixed_dora

        refuse_mixed_dora(mods, f"the {component} LoraConfig of a diffusers LoRA")
        r = Counter(m.rank for m in mods.values()).most_common(1)[0][0]
        alpha = Counter(float(m.alpha) for m in mods.values()).most_common(1)[0][0]
        configs[component] = {
            "r": r,
            "lora_alpha": _num(alpha),
            "rank_pattern": {module_pattern(n, mods): m.rank for n, m in mods.items() if m.rank != r},
            "alpha_pattern": {
                module_pattern(n, mods): _num(m.alpha) for n, m in mods.items() if float(m.alpha) != alpha
            },
            "target_modules": sorted(mods),
            "use_rslora": rslora.pop(),
            "use_dora": any(m.magnitude is not None for m in mods.values()),
            "lora_bias": any(m.bias is not None for m in mods.values()),
            "peft_type": "LORA",
        }
        for module, m in mods.items():
            k = f"{component}.{module}"
            if m.kind == "embedding":
                tensors[f"{k}.lora_embedding_A"], tensors[f"{k}.lora_embedding_B"] = m.down, m.up
            else:
                tensors[f"{k}.lora_A.weight"], tensors[f"{k}.lora_B.weight"] = m.down, m.up
            if m.bias is not None:
                tensors[f"{k}.lora_B.bias"] = m.bias
            if m.magnitude is not None:
                tensors[f"{k}.lora_magnitude_vector"] = m.magnitude
    return {k: v.contiguous() for k, v in tensors.items()}, configs
