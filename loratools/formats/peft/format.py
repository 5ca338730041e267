"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Keys are ``base_model.model.<module>.lora_A.weight`` (r×in) and ``.lora_B.weight`` (out×r), optional
``.lora_B.bias``; embeddings use ``lora_embedding_A`` (r×num_embeddings) / ``lora_embedding_B``
(dim×r); DoRA adds ``lora_magnitude_vector``; ``modules_to_save`` copies and saved embedding
``base_layer`` weights are full tensors. Scale is ``lora_alpha/r`` (``/√r`` with ``use_rslora``), with
``rank_pattern``/``alpha_pattern`` regexes matched as PEFT's ``get_pattern_key`` does.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, ShapeError, UnsupportedError, ValidationError
from loratools.files.safetensors_file import load_file, save_file
from loratools.formats.peft.config import config_for, live_modules
from loratools.formats.peft.config_checks import check_config, float_tensor
from loratools.formats.peft.experts import expert_meta, rank_problem
from loratools.formats.peft.families import FAMILY_TYPES, has_family, read_adapter, write_adapter
from loratools.formats.peft.pipeline import component_folders, read_pipeline
from loratools.formats.registry import AdapterFormat, register_format
from loratools.model.adapter import Adapter, LoraModule
from loratools.model.alora import check_tokens
from loratools.model.experts import has_experts
from loratools.model.tokens import SUFFIX as TOKENS_SUFFIX
from loratools.model.tokens import token_rows
from loratools.publishing.publish import provenance_metadata, read_provenance

if TYPE_CHECKING:
    import torch

    from loratools.formats.registry import KeyResolver

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
#: suffix -> (role) for LoRA tensors, longest first
ROLES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "bias"),
    (".lora_embedding_A", "down_emb"),
    (".lora_embedding_B", "up_emb"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
)
_DEFAULTS = {"r": 8, "lora_alpha": 8}


def get_pattern_key(pattern_keys: list[str], key: str) -> str | None:
    """PEFT's rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", key)``, else None."""
    for p in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({p})$", key):
                return p
        except re.error as exc:
            raise FormatError(f"rank/alpha pattern {p!r} is not a valid regex: {exc}") from None
    return None


def _read_config(path: Path) -> dict[str, Any]:
    from loratools.files.json_file import read_json

    cfg_path = path / CONFIG
    cfg = read_json(cfg_path, CONFIG)
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object", path=cfg_path)
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA" and peft_type not in FAMILY_TYPES:
        raise UnsupportedError(
            f"{cfg_path}: PEFT type {peft_type} is not one loratools reads "
            "(LoRA, DoRA, LoHa, LoKr, OFT, BOFT, IA3)",
            path=cfg_path,
        )
    for key, what in _UNSUPPORTED_FEATURES.items():
        if cfg.get(key):
            raise UnsupportedError(f"{cfg_path}: uses {what}, which loratools does not support", path=cfg_path)
    check_config(cfg, peft_type, cfg_path)  # field types and ranges (target_modules, OFT/BOFT values)
    return cfg


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    st = path / WEIGHTS
    if st.is_file():
        tensors, meta = load_file(st)
        return tensors, meta, st
    binf = path / WEIGHTS_BIN
    if binf.is_file():
        from loratools.files.pickle_file import load_pickle_weights

        return load_pickle_weights(binf), {}, binf
    raise FormatError(
        f"{path}: has {CONFIG} but no {WEIGHTS} or {WEIGHTS_BIN}",
        hint="copy the adapter's weights file next to its config",
        path=path,
    )


def _number(cfg: dict[str, Any], key: str, where: Path) -> float:
    value = _DEFAULTS[key] if cfg.get(key) is None else cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FormatError(f"{where / CONFIG}: {key} must be a finite number, got {value!r}", path=where)
    return float(value)


#: config keys of PEFT LoRA features that change what the tensors mean; refused by name
_UNSUPPORTED_FEATURES = {
    "layer_replication": "layer replication (layer_replication)",
}
#: model types whose projections are transformers' Conv1D (weight stored in x out)
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
#: leaf names that are nn.Linear heads even in Conv1D models (PEFT turns fan_in_fan_out off for them)
_LINEAR_HEADS = frozenset({"lm_head", "score", "classifier", "qa_outputs"})


def split_key(key: str) -> tuple[str, str | None]:
    """``(module, role)`` of a PEFT tensor key; role is None for a full tensor (a replacement).

    Roles: down, up, bias, down_emb, up_emb, magnitude. Replacements come back under the base's tensor
    name (``model.embed_tokens.base_layer.weight`` -> ``model.embed_tokens.weight``).
    """
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    for suffix, role in ROLES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    if name.endswith(".base_layer.weight"):
        name = name[: -len(".base_layer.weight")] + ".weight"
    return name.replace(".modules_to_save.default.", "."), None


def _looks_lora(name: str) -> bool:
    return any(part.startswith(("lora_", "hada_", "lokr_")) for part in name.split(".")[-3:])


def check_structure(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str | None, str, str, str | None]]:
    """Every structural problem of a PEFT tensor set, as ``(module, code, message, tensor)``.

    Checked: each module has A and B, A's rows equal B's columns, factors are at least 2-D, conv B is
    1x1, magnitude and bias have one entry per output, and no tensor has an unknown LoRA name.
    """
    parts: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    problems: list[tuple[str | None, str, str, str | None]] = []

    def add(module: str | None, code: str, message: str, tensor: str | None) -> None:
        problems.append((module, code, message, tensor))

    for key, shape in shapes.items():
        mod, role = split_key(key)
        if role is None:
            if _looks_lora(mod):
                add(None, "unknown_tensor", f"tensor {key} is not a LoRA tensor loratools knows", key)
            continue
        parts.setdefault(mod, {})[role] = (key, tuple(shape))
    for mod, p in sorted(parts.items()):
        emb = "down_emb" in p or "up_emb" in p
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        down, up = p.get("down_emb" if emb else "down"), p.get("up_emb" if emb else "up")
        if down is None or up is None:
            add(mod, "missing_factor", f"module {mod} has no {a_name if down is None else b_name} tensor", None)
            continue
        (ak, a), (bk, b) = down, up
        if len(a) < 2 or len(b) < 2:
            add(mod, "bad_shape", f"module {mod}: {a_name} {list(a)} and {b_name} {list(b)} must be at least 2-D", ak)
            continue
        if a[0] != b[1]:
            add(mod, *rank_problem(mod, a_name, a, b_name, b), bk)
            continue
        if len(a) > 2 and any(s != 1 for s in b[2:]):
            add(mod, "bad_shape", f"module {mod}: conv {b_name} must be 1x1, got {list(b)}", bk)
        for role, what in (("magnitude", "lora_magnitude_vector"), ("bias", "lora_B.bias")):
            # PEFT: (out,) for Linear/Embedding DoRA and a bias; a conv magnitude keeps the kernel's 1s (1, out, 1, 1)
            if role in p and (math.prod(p[role][1]) != b[0] or (len(p[role][1]) != 1 and (len(a) == 2 or sum(
                    d != 1 for d in p[role][1]) > 1))):
                k, s = p[role]
                add(mod, f"{role}_shape", f"module {mod}: {what} has shape {list(s)}, expected ({b[0]},)", k)
    return problems


def _inside_folder(path: Path) -> bool:
    """A file of a PEFT folder given instead of the folder (``…/adapter_model.safetensors``)."""
    return path.is_file() and path.name in (CONFIG, WEIGHTS, WEIGHTS_BIN) and (path.parent / CONFIG).is_file()


def _tensor_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], Path]:
    st = path / WEIGHTS
    if st.is_file():
        from loratools.files.safetensors_file import read_header

        header, _ = read_header(st)
        return {k: t.shape for k, t in header.items()}, st
    tensors, _, f = _read_tensors(path)
    return {k: tuple(t.shape) for k, t in tensors.items()}, f


def _fan_in_fan_out(modules: dict[str, LoraModule], cfg_flag: bool, base: KeyResolver | None) -> None:
    """Decide per module whether the base stores the weight (in, out) (transformers' Conv1D).

    PEFT flips ``fan_in_fan_out`` per layer type at load time, so the config flag is only a hint
    (the last layer decides what it says). With a base: the weight's shape decides when it is not
    square, the model type (GPT-2 family) when it is. Without: the config flag, except on heads.
    """
    model_type = (base.config or {}).get("model_type") if base is not None else None
    for name, m in modules.items():
        if m.kind != "linear":
            continue
        leaf = name.rsplit(".", 1)[-1]
        fifo = cfg_flag and leaf not in _LINEAR_HEADS
        key = base.tensor_key(name) if base is not None else None
        if key is not None:
            shape = tuple(base.info(key).shape)
            straight, flipped = (m.out_features, m.in_features), (m.in_features, m.out_features)
            if straight != flipped and shape in (straight, flipped):
                fifo = shape == flipped
            elif shape == straight == flipped:
                fifo = model_type in CONV1D_MODEL_TYPES and leaf not in _LINEAR_HEADS
        m.fan_in_fan_out = fifo


@register_format
class PeftFormat(AdapterFormat):
    name = "peft"
    layout = "folder"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return (path.is_dir() and (path / CONFIG).is_file()) or _inside_folder(path) or bool(component_folders(path))

    @classmethod
    def structural_findings(cls, path: Path) -> list[tuple[str | None, str, str, str | None]]:
        """All structural problems of the adapter at ``path`` (see :func:`check_structure`), from headers."""
        path = path.parent if _inside_folder(path) else path
        if str(_read_config(path).get("peft_type", "LORA")).upper() in FAMILY_TYPES:
            return []  # family tensors are checked when read
        shapes, _ = _tensor_shapes(path)
        return check_structure(shapes)

    @classmethod
    def read(cls, path: Path, base: KeyResolver | None = None) -> Adapter:
        if component_folders(path):  # a pipeline adapter: one PEFT adapter per component
            return read_pipeline(path, base, cls.read)
        path = path.parent if _inside_folder(path) else path
        cfg = _read_config(path)
        tensors, metadata, weights_file = _read_tensors(path)
        if str(cfg.get("peft_type", "LORA")).upper() in FAMILY_TYPES:
            return read_adapter(path, cfg, tensors, metadata, weights_file)
        problems = check_structure({k: tuple(t.shape) for k, t in tensors.items()})
        if problems:
            mod, code, message, _ = problems[0]
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            err = ShapeError if code.endswith(("shape", "mismatch")) else ValidationError
            raise err(
                f"{weights_file}: {message}{more}",
                hint=f"run 'loratools validate {path}' to list every problem",
                path=weights_file,
            )
        r_default = _number(cfg, "r", path)
        alpha_default = _number(cfg, "lora_alpha", path)
        rank_pattern = _pattern(cfg, "rank_pattern", path)
        alpha_pattern = _pattern(cfg, "alpha_pattern", path)
        rslora = bool(cfg.get("use_rslora", False))
        experts: dict[str, LoraModule] = {}
        if cfg.get("target_parameters"):  # ParamWrappers: expert slices of 3-D parameters (formats/peft/experts.py)
            from loratools.formats.peft.experts import read_param_wrappers

            def rank_of(p: str) -> int:
                return _rank(p, r_default, rank_pattern, path)

            def alpha_of(p: str) -> float:
                key = get_pattern_key(list(alpha_pattern), p)
                return _to_float(alpha_pattern[key], path) if key is not None else alpha_default

            experts, tensors = read_param_wrappers(
                cfg, tensors, path, weights_file, base, rank_of, alpha_of, rslora, split_key,
                ours=read_provenance(metadata) is not None,
            )

        parts: dict[str, dict[str, torch.Tensor]] = {}
        replacements: dict[str, torch.Tensor] = {}
        token_values: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            mod, role = split_key(key)
            if role is None and mod.endswith(TOKENS_SUFFIX):  # trainable tokens: new rows (loratools/tokens.py)
                token_values[mod.removesuffix(TOKENS_SUFFIX)] = tensor
            elif role is None:
                replacements[mod] = float_tensor(weights_file, key, tensor)
            else:
                parts.setdefault(mod, {})[role] = tensor

        modules: dict[str, LoraModule] = {}
        for mod, p in sorted(parts.items()):
            emb = "down_emb" in p or "up_emb" in p
            down, up = p["down_emb" if emb else "down"], p["up_emb" if emb else "up"]
            alpha_key = get_pattern_key(list(alpha_pattern), mod)
            alpha = _to_float(alpha_pattern[alpha_key], path) if alpha_key is not None else alpha_default
            kind = "embedding" if emb else ("conv" if down.ndim > 2 else "linear")
            modules[mod] = LoraModule(
                down=down,
                up=up,
                alpha=alpha,
                kind=kind,
                use_rslora=rslora,
                magnitude=p.get("magnitude"),
                bias=p.get("bias"),
            )
        if cfg.get("use_dora") and (plain := [n for n, m in modules.items() if m.magnitude is None]):
            why = f"adapter_config.json sets use_dora, but {plain[0]} has no lora_magnitude_vector"  # PEFT: m = |W|
            raise ValidationError(f"{weights_file}: {why}", hint="re-save it with PEFT, or use_dora false", path=path)
        _fan_in_fan_out(modules, bool(cfg.get("fan_in_fan_out", False)), base)
        modules.update(experts)  # after: their ranks are r / rank_pattern by construction, their layout known
        return Adapter(
            modules=modules,
            replacements=replacements,
            meta={
                "format": "peft",
                "base_model": cfg.get("base_model_name_or_path"),
                "config": cfg,
                "metadata": metadata,
                "provenance": read_provenance(metadata),
                "declared_ranks": {
                    m: _declared_rank(m, r_default, rank_pattern, path) for m in modules if m not in experts
                },
                "alora_invocation_tokens": check_tokens(cfg.get("alora_invocation_tokens"), path / CONFIG),
                "files": [str(path / CONFIG), str(weights_file)],
                "config_modules": None if experts else sorted(modules),  # what target_modules selected
                **expert_meta(experts),  # the parameter wrappers, for the writer (formats/peft/expert_write.py)
                **(
                    {"trainable_tokens": token_rows(token_values, cfg.get("trainable_token_indices"), path / CONFIG)}
                    if token_values
                    else {}
                ),
            },
        )

    @classmethod
    def write(cls, adapter: Adapter, path: Path, provenance: dict[str, Any] | None = None, **options: Any) -> None:
        if has_family(adapter):
            return write_adapter(adapter, path, provenance)
        if has_experts(adapter) or adapter.meta.get("param_modules"):  # target_parameters wrappers
            from loratools.formats.peft.expert_write import write_with_experts

            return write_with_experts(adapter, path, provenance, cls.write)
        path.mkdir(parents=True, exist_ok=True)
        cfg = config_for(adapter)
        tensors: dict[str, torch.Tensor] = {}
        for name, m in live_modules(adapter).items():
            k = PREFIX + name
            if m.kind == "embedding":
                tensors[f"{k}.lora_embedding_A"] = m.down
                tensors[f"{k}.lora_embedding_B"] = m.up
            else:
                tensors[f"{k}.lora_A.weight"] = m.down
                tensors[f"{k}.lora_B.weight"] = m.up
            if m.bias is not None:
                tensors[f"{k}.lora_B.bias"] = m.bias
            if m.magnitude is not None:
                tensors[f"{k}.lora_magnitude_vector"] = m.magnitude
        for key, t in adapter.replacements.items():
            mod, _, suffix = key.rpartition(".")
            if mod in adapter.modules and adapter.modules[mod].kind == "embedding":
                key = f"{mod}.base_layer.{suffix}"
            tensors[PREFIX + key] = t
        metadata = {"format": "pt"}
        if provenance:
            metadata.update(provenance_metadata(provenance))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS), metadata=metadata)
        (path / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _rank(param: str, r: float, rp: dict[str, Any], where: Path) -> int:
    """The rank r / rank_pattern give a wrapped parameter: it decides how lora_A's rows split into experts."""
    key = get_pattern_key(list(rp), param)
    value = _to_float(rp[key], where) if key is not None else r
    if not value.is_integer() or value < 1:
        field = f"rank_pattern[{key!r}]" if key is not None else "r"
        raise FormatError(f"{where / CONFIG}: {field} must be a positive integer, got {value:g}", path=where)
    return int(value)


def _declared_rank(mod_name: str, r: float, rp: dict[str, Any], where: Path) -> int:
    key = get_pattern_key(list(rp), mod_name)
    return int(_to_float(rp[key], where)) if key is not None else int(r)


def _to_float(value: Any, where: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FormatError(f"{where / CONFIG}: pattern value {value!r} is not a finite number", path=where)
    return float(value)


def _pattern(cfg: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise FormatError(f"{where / CONFIG}: {key} must be an object of regex -> number", path=where)
    return value
