"""The original-layout diffusion-transformer files (Flux, Wan, Qwen-Image) as adapters: read (kohya/musubi, ComfyUI,
BFL/DiffSynth bare names; ``KohyaFormat`` hands them here), written as kohya (``lora_unet_…``) or ComfyUI
(``diffusion_model.…``; the ``comfyui`` format registered here).

ComfyUI files are written with ``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` beside ``diffusion_model.``
names: ComfyUI's ``comfy/lora.py`` reads them, and so does diffusers (its Flux loader turns ``diffusion_model.``
into ``lora_unet_`` and takes the kohya path).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import UnsupportedError, name_list
from loratools.formats.dit.bfl_control import check_in_width, is_norm, norm_replacements
from loratools.formats.dit.flux_io import (
    bfl_prefix,
    fuse_to_bfl,
    kohya_text_name,
    place,
    read_bfl_named,
    shared_names,
    text_names,
    text_prefix,
)
from loratools.formats.dit.layouts import HANDLED, LABELS, DitLayout, detect, refuse_unhandled
from loratools.formats.dit.tables import table_for
from loratools.formats.registry import AdapterFormat, register_format
from loratools.model.adapter import Adapter, LoraModule

if TYPE_CHECKING:
    import torch

    from loratools.formats.registry import KeyResolver

_COMFY = ("model.diffusion_model.", "diffusion_model.")


def read_dit(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], base: KeyResolver | None,
    found: DitLayout,
) -> Adapter:  # fmt: skip
    """A Flux, Wan or Qwen-Image file in the kohya, ComfyUI or bare layout as an :class:`Adapter` (others refused
    by name)."""
    from loratools.publishing.publish import read_provenance

    found = shared_names(found, base, metadata)
    if found.family == "ltx_cogvideo":  # names LTX-Video and CogVideoX share: the prefix or the base tells
        from loratools.formats.dit.cogvideox import resolve

        found = resolve(path, found, list(tensors), base)
    refuse_unhandled(path, found)
    if found.family == "hidream" and found.layout == "kohya":
        from loratools.formats.dit.hidream import refuse_text

        refuse_text(path, list(tensors))
    if found.family == "z_image":  # names Lumina2 shares: the qkv's shape or the base decides (lumina2.refine)
        from loratools.formats.dit.lumina2 import refine

        found = refine(found, tensors, base)
    norms = {k: t for k, t in tensors.items() if found.layout == "bfl-control" and is_norm(k)}
    if found.layout == "xlabs":  # x-flux processor LoRAs: diffusers-named parts, alpha = rank (formats/dit/xlabs.py)
        from loratools.formats.dit.xlabs import read_xlabs

        modules = place(path, found, None, read_xlabs(path, tensors), base)
        assumed: list[str] = []
    else:
        bfl, text, assumed = read_bfl_named(path, {k: t for k, t in tensors.items() if k not in norms}, found)
        modules = place(path, found, bfl, None, base)
        modules.update(text_names(text, base, found.family))
    replacements = {}
    if found.layout == "bfl-control":  # q/k norm scales replaced, img_in's wider input (formats/dit/bfl_control.py)
        replacements = norm_replacements(path, norms, bfl_prefix(base))  # the file's own damage named first
        check_in_width(path, modules, base)
    return Adapter(
        modules=modules,
        replacements=replacements,
        meta={
            "format": "kohya" if found.layout == "kohya" else "diffusers" if found.layout == "xlabs" else "comfyui",
            "dit": {"family": found.family, "layout": found.layout},
            "base_model": metadata.get("ss_sd_model_name") or metadata.get("modelspec.architecture"),
            "metadata": metadata,
            "provenance": read_provenance(metadata),
            "alpha_assumed": assumed,
            "files": [str(path)],
        },
    )


def dit_family(adapter: Adapter) -> str | None:
    """The diffusion-transformer family of an adapter (recorded by its reader, else told by its module names)."""
    recorded = (adapter.meta.get("dit") or {}).get("family")
    if recorded:
        return str(recorded)
    names = [_peft_bare(n) for n in adapter.modules if not n.startswith(("text_encoder", "lora_te"))]
    found = detect(f"{n}.lora_A.weight" for n in names) if names else None
    return found.family if found is not None else None


def _peft_bare(name: str) -> str:
    """``transformer.base_model.model.X`` (a PEFT-wrapped model's state dict under save_lora_weights) as
    ``transformer.X``: the name merge and validate resolve it by."""
    return name.replace("transformer.base_model.model.", "transformer.", 1)


def _original(name: str, table: Any) -> tuple[str | None, str | None]:
    """``(diffusers path, original path)`` of an adapter's module name, one of them None: ``transformer.`` + a
    diffusers path, an original path (bare or ``diffusion_model.``), or a bare diffusers path; both None when it
    is no module of the family."""
    name = _peft_bare(name)
    rest = name.removeprefix("transformer.")
    bare = next((name[len(p) :] for p in _COMFY if name.startswith(p)), name)
    if name.startswith("transformer.") and table.to_original(rest) is not None:
        return rest, None
    if table.to_diffusers(bare) is not None:
        return None, bare
    return (name, None) if table.to_original(name) is not None else (None, None)


def _bfl_named(adapter: Adapter, family: str) -> tuple[dict[str, LoraModule], dict[str, LoraModule]]:
    """``(transformer modules by original path, text-encoder modules by kohya name)``; refuses what the family's
    original-layout files cannot hold."""
    table, label = table_for(family), LABELS.get(family, family)
    diffusers: dict[str, LoraModule] = {}
    bfl: dict[str, LoraModule] = {}
    text: dict[str, LoraModule] = {}
    bad: list[str] = []
    for name, m in adapter.modules.items():
        conv = getattr(m, "kind", None) == "conv" and bool(getattr(table_for(family), "CONV", ()))  # SD3 x_embedder
        if not isinstance(m, LoraModule) or (m.kind != "linear" and not conv) or m.magnitude is not None \
                or m.bias is not None:  # fmt: skip
            dora = getattr(m, "magnitude", None) is not None
            bad.append(f"{name} ({'DoRA' if dora else getattr(m, 'label', m.kind)})")
            continue
        kohya = name if name.startswith(tuple(text_prefix(family))) else kohya_text_name(name, family)
        if kohya is not None:
            text[kohya] = m
            continue
        as_diffusers, as_original = _original(name, table)
        if as_diffusers is not None:
            diffusers[as_diffusers] = m
        elif as_original is not None:
            bfl[as_original] = m
        else:
            bad.append(f"{name} (not a {label} module)")
    if bad or adapter.replacements:
        bad += [f"{k} (full replacement)" for k in adapter.replacements]
        raise UnsupportedError(
            f"an original-layout {label} LoRA cannot hold {len(bad)} part(s) of this adapter: " + name_list(bad, 5),
            hint="write it as diffusers (loratools convert ADAPTER --to diffusers -o OUT), or leave those parts out "
            "(loratools convert ADAPTER --to comfyui --exclude REGEX -o OUT)",
        )
    if getattr(table, "SPLIT_FILES", False):  # Z-Image: its trainers' files hold diffusers' names (lumina2.py)
        from loratools.formats.dit.flux_io import split_to_diffusers

        diffusers.update(split_to_diffusers(Path("adapter"), bfl, table))
        bfl = {}
    fused = diffusers if getattr(table, "SPLIT_FILES", False) else fuse_to_bfl(diffusers, None, table)
    clash = sorted(set(fused) & set(bfl))
    if clash:
        raise UnsupportedError(f"module {clash[0]} is given twice (as itself and as its diffusers parts)")
    return {**bfl, **fused}, text


def dit_tensors(adapter: Adapter, layout: str) -> dict[str, torch.Tensor] | None:
    """The state dict of a Flux/Wan/Qwen-Image adapter in ``layout`` (``kohya`` | ``comfyui``), or None for an
    adapter that is not a diffusion-transformer one; other families are refused by name."""
    import torch

    family = dit_family(adapter)
    if family is None:
        return None
    if family == "ltx_cogvideo":  # attn1/ff only: ComfyUI names are the same in both families, kohya's are not
        from loratools.formats.dit.cogvideox import shared_layout

        family = shared_layout(layout)
    label = LABELS.get(family, family)
    if family not in HANDLED:
        raise UnsupportedError(
            f"this is a {label} LoRA; loratools writes the kohya and ComfyUI layouts of Flux, SD3, HunyuanVideo, Wan "
            "and Qwen-Image only for now",
            hint="write it as diffusers or PEFT: loratools convert ADAPTER --to diffusers -o OUT",
        )
    modules, text = _bfl_named(adapter, family)
    if text and layout != "kohya":
        raise UnsupportedError(
            f"a ComfyUI {label} file written here holds the transformer only; {len(text)} text-encoder module(s) "
            "would be lost",
            hint="write it as kohya (loratools convert ADAPTER --to kohya -o OUT), or leave the text encoder out "
            "(loratools convert ADAPTER --to comfyui --exclude '^text_encoder' -o OUT)",
        )
    out: dict[str, torch.Tensor] = {}
    table = table_for(family)  # CogVideoX-Fun's kohya names: lora_unet__ + diffusers' path (cogvideox.py)
    unet, path_of = getattr(table, "KOHYA_PREFIX", "lora_unet_"), getattr(table, "kohya_path", lambda k: k)
    names = {f"{unet}{path_of(k).replace('.', '_')}" if layout == "kohya" else f"diffusion_model.{k}": m
             for k, m in modules.items()}  # fmt: skip
    names.update(text)
    for k, m in sorted(names.items()):
        alpha = float(m.alpha) * (m.rank**0.5 if m.use_rslora else 1.0)  # kohya has no rsLoRA: fold √r into alpha
        out[f"{k}.lora_down.weight"] = m.down.contiguous()
        out[f"{k}.lora_up.weight"] = m.up.contiguous()
        exact = torch.tensor(alpha, dtype=torch.float32)
        out[f"{k}.alpha"] = exact if float(exact) == alpha else torch.tensor(alpha, dtype=torch.float64)
    return out


def diffusers_named(adapter: Adapter) -> Adapter:
    """A diffusion-transformer adapter whose modules carry original-layout names (read against an original-layout
    single file) with diffusers' ``transformer.`` names instead (fused modules split); any other adapter as it is."""
    from dataclasses import replace

    from loratools.formats.dit.flux_io import split_to_diffusers

    family = (adapter.meta.get("dit") or {}).get("family") or dit_family(adapter)
    if family not in HANDLED:
        return adapter
    table = table_for(family)
    bfl = {}
    for name in adapter.modules:
        if not name.startswith("transformer."):
            as_original = _original(name, table)[1]
            if as_original is not None:
                bfl[name] = as_original
    if not bfl:
        return adapter
    split = split_to_diffusers(Path(str(adapter.meta.get("source") or "adapter")),
                               {bare: adapter.modules[n] for n, bare in bfl.items()}, table)  # fmt: skip
    modules = {k: m for k, m in adapter.modules.items() if k not in bfl}
    modules.update({f"transformer.{k}": m for k, m in split.items()})
    return replace(adapter, modules=modules, meta=dict(adapter.meta))


@register_format
class ComfyUIFormat(AdapterFormat):
    """ComfyUI/BFL-layout diffusion-transformer LoRAs (read through ``kohya``'s sniffing; written here)."""

    name = "comfyui"
    layout = "file"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return False  # KohyaFormat sniffs diffusion_model.* files and hands them to read_dit

    @classmethod
    def read(cls, path: Path, base: KeyResolver | None = None) -> Adapter:
        from loratools.errors import FormatError
        from loratools.files.safetensors_file import load_file
        from loratools.formats.dit.layouts import original_layout

        tensors, metadata = load_file(path)
        found = original_layout(tensors)
        if found is None:
            raise FormatError(f"{path}: no diffusion-transformer LoRA tensors (diffusion_model.double_blocks.…)",
                              path=path)  # fmt: skip
        return read_dit(path, tensors, metadata, base, found)

    @classmethod
    def write(cls, adapter: Adapter, path: Path, provenance: dict[str, Any] | None = None, **options: Any) -> None:
        from loratools.files.safetensors_file import save_file
        from loratools.publishing.publish import provenance_metadata

        tensors = dit_tensors(adapter, "comfyui")
        if tensors is None:
            raise UnsupportedError(
                "the comfyui format writes diffusion-transformer (Flux, Wan, Qwen-Image) LoRAs; this adapter is not "
                "one",
                hint="an SD1/SD2/SDXL LoRA is written as kohya: loratools convert ADAPTER --to kohya -o OUT",
            )
        metadata = {"format": "pt"}
        if provenance:
            metadata.update(provenance_metadata(provenance))
        save_file(tensors, str(path), metadata=metadata)


__all__ = ["ComfyUIFormat", "diffusers_named", "dit_family", "dit_tensors", "read_dit"]
