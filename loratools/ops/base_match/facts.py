"""What an adapter says about the model it was trained on, and what a base says about itself, as
:class:`ModelFacts` (names and comparable facts); the rule that compares them is in ``__init__``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import LoratoolsError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter

#: size -> the config keys that spell it (transformers' attribute maps, per family)
SIZE_KEYS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "intermediate_size": ("intermediate_size", "n_inner", "d_ff"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads",),
}
_CLASS_TAIL = re.compile(r"(For[A-Z]\w*|LMHeadModel|PreTrainedModel|Model|Pipeline)$")
#: how far up from the adapter's folder a relative base path is looked for (PEFT records it as typed)
_PARENTS = 4


@dataclass
class ModelFacts:
    """What is known of one model: how it is named, and the facts to compare."""

    label: str
    names: set[str] = field(default_factory=set)
    model_types: set[str] = field(default_factory=set)
    families: set[str] = field(default_factory=set)
    sizes: dict[str, int] = field(default_factory=dict)
    sd_family: str | None = None
    source: str | None = None  # the config the facts were read from

    @property
    def has_facts(self) -> bool:
        return bool(self.model_types or self.families or self.sizes or self.sd_family)


def norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _family(cls: str) -> str | None:
    """``Qwen2ForCausalLM`` -> ``qwen2``, ``GPT2LMHeadModel`` -> ``gpt2``; None for what is not a class name."""
    if not isinstance(cls, str) or not cls[:1].isupper():
        return None
    return norm(_CLASS_TAIL.sub("", cls)) or None


def _library_family(mapping: dict[str, Any]) -> str | None:
    """PEFT's ``auto_mapping`` of a transformers model: its model folder (``transformers.models.qwen2.…`` ->
    qwen2). Another library's class (a trl value-head wrapper, a custom module) says nothing of the base."""
    lib = mapping.get("parent_library")
    found = re.match(r"transformers\.models\.(\w+)\.", lib) if isinstance(lib, str) else None
    return norm(found.group(1)) if found else None


def _sd_family(text: Any) -> str | None:
    """The Stable Diffusion family a kohya/modelspec tag or a pipeline class names, or None."""
    if not isinstance(text, str) or not text:
        return None
    t = text.lower().replace("_", "-")
    if "flux" in t:
        return "flux"
    if "xl" in t:
        return "sdxl"
    if re.search(r"(stable-?diffusion-?|sd-?)3", t):
        return "sd3"
    if re.search(r"stable-?diffusion|^sd-?v?[12]", t):
        return "sd"
    return None


def _positive(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _add_config(facts: ModelFacts, cfg: Any, source: str | None) -> None:
    """The comparable facts of a transformers ``config.json`` or a diffusers ``model_index.json``."""
    if not isinstance(cfg, dict):
        return
    facts.source = facts.source or source
    parts = [cfg] + [cfg[k] for k in ("text_config", "llm_config") if isinstance(cfg.get(k), dict)]
    for part in parts:
        if isinstance(part.get("model_type"), str) and part["model_type"]:
            facts.model_types.add(part["model_type"])
        archs = part.get("architectures")
        for a in archs if isinstance(archs, list) else []:
            fam = _family(a)
            if fam:
                facts.families.add(fam)
    for size, keys in SIZE_KEYS.items():
        for part in parts:  # the top level first, then the language model's (multimodal configs)
            value = next((_positive(part.get(k)) for k in keys if _positive(part.get(k))), None)
            if value:
                facts.sizes[size] = value
                break
    if isinstance(cfg.get("_class_name"), str):  # a diffusers pipeline
        facts.sd_family = _sd_family(cfg["_class_name"])
    name = cfg.get("_name_or_path")
    if isinstance(name, str) and name.strip():
        facts.names |= _name_keys(name, [])


def _hub_id(text: str) -> str | None:
    from loratools.publishing.card import hub_model_id

    try:
        return hub_model_id(text)
    except (OSError, ValueError):  # it tries the text as a path: too long, a NUL byte
        return None


def _name_keys(text: str, roots: Sequence[Path]) -> set[str]:
    """The identity keys of a model name: the text itself, its Hub id, and every folder/file it resolves to."""
    text = text.strip()
    keys = {f"raw:{text}"}
    hub = _hub_id(text)
    if hub:
        keys.add(f"hub:{hub.lower()}")
    for p in _local_candidates(text, roots):
        keys.add(f"path:{os.path.realpath(p)}")
        info = _hub_info(p)
        if info:
            keys.add(f"hub:{info.lower()}")
    return keys


def _hub_info(path: Path) -> str | None:
    from loratools.publishing.hub import hub_info_for

    info = hub_info_for(path)
    return info.get("repo_id") if info else None


def _local_candidates(text: str, roots: Sequence[Path]) -> list[Path]:
    """Where a recorded path exists here: as written (from the working directory), then under ``roots``."""
    if text.startswith("hf://") or not text:
        return []
    p = Path(text).expanduser()
    tries = [p] if p.is_absolute() else [p, *(r / p for r in roots)]
    found = []
    for t in tries:
        try:
            if t.exists():
                found.append(t)
        except (OSError, ValueError):  # too long, a NUL byte: not a path here
            continue
    return found


def _cached_config(hub_id: str, revision: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``config.json`` (or ``model_index.json``) of a Hub model from the local cache only."""
    from loratools.files.json_file import read_json

    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency
        return None, None
    for name in ("config.json", "model_index.json"):
        try:
            found = try_to_load_from_cache(hub_id, name, revision=revision if isinstance(revision, str) else None)
        except Exception:  # noqa: BLE001 - an invalid id or cache: nothing known
            continue
        if isinstance(found, str):
            try:
                return read_json(Path(found), name), found
            except LoratoolsError:
                return None, None
    return None, None


def _folder_config(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    from loratools.files.json_file import read_json

    for name in ("config.json", "model_index.json"):
        f = path / name if path.is_dir() else None
        if f is not None and f.is_file():
            try:
                cfg = read_json(f, name)
            except LoratoolsError:
                return None, None
            return (cfg, str(f)) if isinstance(cfg, dict) else (None, None)
    return None, None


def _adapter_roots(adapter: Adapter) -> list[Path]:
    files = adapter.meta.get("files") or []
    if not files:
        return []
    folder = Path(os.path.abspath(files[0])).parent
    return [folder, *list(folder.parents)[:_PARENTS]]


def claimed_base(adapter: Adapter) -> ModelFacts | None:
    """What ``adapter`` says it was trained on, or None when it says nothing."""
    name = adapter.base_model if isinstance(adapter.base_model, str) and adapter.base_model.strip() else None
    cfg = adapter.meta.get("config") if isinstance(adapter.meta.get("config"), dict) else {}
    mapping = cfg.get("auto_mapping") if isinstance(cfg.get("auto_mapping"), dict) else {}
    cls = _library_family(mapping)
    metadata = adapter.meta.get("metadata") if isinstance(adapter.meta.get("metadata"), dict) else {}
    sd = _sd_family(metadata.get("modelspec.architecture")) or _sd_family(metadata.get("ss_base_model_version"))
    if name is None and cls is None and sd is None:
        return None
    label = name or str(mapping.get("base_model_class") or sd)
    facts = ModelFacts(label=label if len(label) <= 200 else label[:200] + "…")
    if cls:
        facts.families.add(cls)
    facts.sd_family = sd
    if name is not None:
        facts.names = _name_keys(name, _adapter_roots(adapter))
        found, where = None, None
        for p in _local_candidates(name, _adapter_roots(adapter)):
            found, where = _folder_config(p)
            if found is not None:
                break
        if found is None and _hub_id(name):
            found, where = _cached_config(_hub_id(name), cfg.get("revision"))
        if found is not None:
            sd_claim = facts.sd_family
            _add_config(facts, found, where)
            facts.sd_family = sd_claim or facts.sd_family
    return facts


def base_facts(reader: CheckpointReader, spec: str | Path | None = None, *, _depth: int = 0) -> ModelFacts:
    """What the base opened by ``reader`` (given as ``spec``) says about itself."""
    root = Path(reader.root)
    facts = ModelFacts(label=str(spec if spec is not None else root))
    facts.names = _name_keys(str(root), [])
    if spec is not None:
        facts.names |= _name_keys(str(spec), [])
    _add_config(facts, reader.config, str(root / "config.json") if reader.config else None)
    if reader.kind == "file" and reader.config is None:  # one weights file of a model folder: its config
        beside, where = _folder_config(root.parent)
        if isinstance(beside, dict) and beside.get("model_type"):
            _add_config(facts, beside, where)
    if reader.kind == "pipeline":
        _add_config(facts, getattr(reader, "index", None), str(root / "model_index.json"))
    elif reader.kind == "file":
        fam = _ldm_family(reader)
        facts.sd_family = facts.sd_family or fam
    _add_provenance(facts, reader, _depth)
    return facts


class FolderBase:
    """A base known by its folder alone (an ONNX export: ``model.onnx`` beside the ``config.json`` the
    export copied): what :func:`base_facts` reads of it."""

    kind = "folder"
    files: list[Path] = []

    def __init__(self, folder: Path) -> None:
        self.root = folder
        self.config, _ = _folder_config(folder)


def _ldm_family(reader: CheckpointReader) -> str | None:
    """A single-file Stable Diffusion checkpoint's family from its key layout."""
    try:
        keys = reader.keys()
    except LoratoolsError:
        return None
    heads = {k.split(".", 2)[0] + "." + k.split(".", 2)[1] for k in keys if k.count(".") >= 2}
    if "conditioner.embedders" in heads:
        return "sdxl"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys[:4096]):
        return "flux"
    if any("joint_blocks." in k for k in keys[:4096]):
        return "sd3"
    if "cond_stage_model.transformer" in heads or "cond_stage_model.model" in heads:
        return "sd"
    return None


def _add_provenance(facts: ModelFacts, reader: CheckpointReader, depth: int) -> None:
    """A merged output of ours: the base its provenance names is another name of it (and its config, if it has none)."""
    from loratools.publishing.publish import read_provenance

    if depth > 2 or not reader.files:
        return
    try:
        record = read_provenance(reader.metadata(reader.files[0]))
    except (LoratoolsError, OSError):
        return
    inputs = (record or {}).get("inputs") if isinstance(record, dict) else None
    base = inputs.get("base") if isinstance(inputs, dict) else None
    if not isinstance(base, dict):
        return
    for key in ("repo_id", "path"):
        if isinstance(base.get(key), str) and base[key].strip():
            facts.names |= _name_keys(base[key], [])
    path = base.get("path")
    if facts.has_facts or not isinstance(path, str) or not Path(path).exists():
        return
    from loratools.checkpoint.reader import open_checkpoint

    try:
        with open_checkpoint(path) as original:
            more = base_facts(original, path, _depth=depth + 1)
    except (LoratoolsError, OSError):
        return
    facts.names |= more.names
    facts.model_types, facts.families, facts.sizes = more.model_types, more.families, more.sizes
    facts.sd_family, facts.source = facts.sd_family or more.sd_family, more.source
