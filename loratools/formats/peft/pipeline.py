"""A pipeline adapter as PEFT holds it: one PEFT adapter per component (``OUT/unet/``,
``OUT/text_encoder/`` ...), since PEFT adapts one model at a time. Read as one adapter whose module
names carry the component first (``unet.down_blocks.0...``), like kohya and diffusers pipeline LoRAs,
so that ``convert --to peft`` of a pipeline LoRA and ``convert`` back are lossless."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loratools.formats.registry import KeyResolver
    from loratools.model.adapter import Adapter

CONFIG = "adapter_config.json"
#: top-level components of a diffusers pipeline that hold adapted models
PIPELINE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior", "decoder")


def component_folders(path: Path) -> list[tuple[str, Path]]:
    """(component, folder) for each PEFT adapter under ``path``'s component sub-folders; [] when ``path``
    is not such a pipeline folder (it has its own adapter_config.json, or no component holds one)."""
    if not path.is_dir() or (path / CONFIG).is_file():
        return []
    return [(c, path / c) for c in PIPELINE_COMPONENTS if (path / c / CONFIG).is_file()]


def read_pipeline(
    path: Path, base: KeyResolver | None, read_one: Callable[[Path, KeyResolver | None], Adapter]
) -> Adapter:
    """The component adapters under ``path`` as one adapter (names prefixed with their component)."""
    from dataclasses import replace

    modules: dict = {}
    replacements: dict = {}
    files: list[str] = []
    declared: dict = {}
    first = None
    for component, folder in component_folders(path):
        sub_base = base.components.get(component) if base is not None and base.kind == "pipeline" else None
        part = read_one(folder, sub_base)
        first = first or part
        modules.update({f"{component}.{k}": m for k, m in part.modules.items()})
        replacements.update({f"{component}.{k}": t for k, t in part.replacements.items()})
        declared.update({f"{component}.{k}": r for k, r in (part.meta.get("declared_ranks") or {}).items()})
        files += [str(f) for f in part.meta.get("files") or []]
    assert first is not None  # the format sniffed component folders
    meta = {**first.meta, "pipeline": True, "files": files, "declared_ranks": declared, "config": None}
    return replace(first, modules=modules, replacements=replacements, meta=meta)


def split_components(adapter: Adapter) -> dict[str, Adapter]:
    """A pipeline adapter (kohya / diffusers / LyCORIS, or one read from component folders) as one
    adapter per component with the prefix removed; ``{}`` for a single-model adapter."""
    from dataclasses import replace

    pipeline = adapter.format in ("kohya", "diffusers", "lycoris") or adapter.meta.get("pipeline")
    if not pipeline or not adapter.modules or adapter.replacements:
        return {}
    parts: dict[str, dict] = {}
    for name, m in adapter.modules.items():
        component, _, rest = name.partition(".")
        if component not in PIPELINE_COMPONENTS or not rest:
            return {}
        parts.setdefault(component, {})[rest] = m
    meta = {k: v for k, v in adapter.meta.items() if k not in ("pipeline", "declared_ranks", "config")}
    return {c: replace(adapter, modules=mods, meta=dict(meta)) for c, mods in parts.items()}
