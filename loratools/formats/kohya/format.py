"""kohya / sd-scripts LoRA files: one ``.safetensors`` with underscore names.

A key is ``<prefix><module path with . -> _>.<part>`` where the prefix is ``lora_unet_`` (UNet),
``lora_te_`` (SD1/2 text encoder) or ``lora_te1_`` / ``lora_te2_`` (SDXL's two text encoders) and the part
is ``lora_down.weight`` (A), ``lora_up.weight`` (B), ``alpha`` (a scalar; missing, zero or None means
alpha = rank) or LyCORIS' ``dora_scale``. Conv (LoCon) modules have a k×k down and a 1×1 up. Metadata
(``ss_*``, ``modelspec.*``) is kept; ``ss_network_dim``/``ss_network_alpha`` and the
``sshs_model_hash``/``sshs_legacy_hash`` digests are recomputed when the tensors change.

Underscores make names ambiguous (``to_out_0`` is ``to_out.0``), so names are resolved against a base's
real module paths when one is given; without a base, modules keep their kohya names.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, UnsupportedError, UsageError, ValidationError, name_list
from loratools.files.safetensors_file import load_file, read_header, save_file
from loratools.formats.alpha_values import alpha_tensor, warn_zero_alpha
from loratools.formats.dit.layouts import original_layout
from loratools.formats.kohya.lycoris import PARTS as LYCORIS_PARTS
from loratools.formats.kohya.lycoris import family_parts, module_from_parts, read_alpha
from loratools.formats.kohya.meta import content_digest, sd_scripts_hashes
from loratools.formats.registry import AdapterFormat, register_format
from loratools.model.adapter import Adapter, LoraModule
from loratools.publishing.publish import METADATA_KEY, provenance_metadata, read_provenance

if TYPE_CHECKING:
    import torch

    from loratools.formats.registry import KeyResolver

#: kohya prefix -> diffusers pipeline component
PREFIX_COMPONENT = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora_scale"}
_NAME = re.compile(r"^(lora_[a-z0-9]+_|lycoris_)[A-Za-z0-9_]+$")
#: LyCORIS algorithms other than LoRA/LoCon, by a tensor part they use
_LYCORIS = {
    "hada_w1_a": "LoHa",
    "hada_w1_b": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "lokr_w2": "LoKr",
    "lokr_w2_a": "LoKr",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "lora_mid.weight": "LoCon (Tucker)",
    "diff": "full-weight difference",
    "w_norm": "norm",
    "on_input": "(IA)³",
    "weight": "(IA)³",
}
_FLUX_SD3 = (
    "lora_unet_double_blocks_",
    "lora_unet_single_blocks_",
    "lora_unet_joint_blocks_",
    "lora_te3_",
    "lora_transformer_",
    "diffusion_model.",
    "lora_unet_img_in",
    "lora_unet_txt_in",
)
_TE_ROOTS = ("encoder.", "embeddings.", "final_layer_norm")


def _refuse_layouts(path: Path, keys: list[str]) -> None:
    """One clear line for Flux/SD3 and LyCORIS files we recognize but do not handle."""
    for k in keys:
        if k.startswith(_FLUX_SD3):
            raise UnsupportedError(
                f"{path}: {k!r} is a diffusion-transformer (Flux/SD3/...) LoRA layout with no module loratools knows; "
                "it reads SD1/SD2/SDXL kohya files and Flux, Wan and Qwen-Image transformer LoRAs",
                path=path,
            )
    for k in keys:
        part = k.split(".", 1)[1] if "." in k else ""
        if part in _LYCORIS and part not in LYCORIS_PARTS:
            raise UnsupportedError(
                f"{path}: {k!r} is a LyCORIS {_LYCORIS[part]} tensor; loratools reads LoRA/LoCon, LoHa, LoKr and "
                "diag-OFT",
                hint="merge it with its training tool, or extract a plain LoRA from the merged model",
                path=path,
            )


def _split(key: str) -> tuple[str, str] | None:
    name, _, part = key.partition(".")
    if part in LYCORIS_PARTS and _NAME.match(name):
        return name, part
    return (name, _PARTS[part]) if part in _PARTS and _NAME.match(name) else None


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _module_paths(reader: KeyResolver) -> list[str]:
    return [k[: -len(".weight")] for k in reader.keys() if k.endswith(".weight")]


def _name_index(paths: list[str], text_encoder: bool, config: dict[str, Any] | None = None) -> dict[str, str | None]:
    """underscore name -> module path (None when two paths collide); with a UNet ``config``, the original
    (SGM) UNet names sd-scripts uses for SDXL map to the diffusers paths too."""
    from loratools.formats.kohya.sgm import sgm_path

    unet = config if config and "layers_per_block" in config else None
    index: dict[str, str | None] = {}
    for p in paths:
        names = {_underscored(p)}
        sgm = sgm_path(p, unet) if unet else None
        if sgm:
            names.add(_underscored(sgm))
        if text_encoder:  # the Hub's CLIP checkpoints nest under text_model., transformers 5 saves without it
            names.add(_underscored(p.removeprefix("text_model.")))
            if not p.startswith("text_model."):
                names.add("text_model_" + _underscored(p))
        for n in names:
            index[n] = None if n in index and index[n] != p else p
    return index


class _Resolver:
    """Kohya names -> the base's module paths (component-prefixed for a diffusers pipeline)."""

    def __init__(self, base: KeyResolver) -> None:
        from loratools.checkpoint.ldm_keymap import ldm_layout  # a name table; reads no tensors

        self.base = base
        self._indexes: dict[str, dict[str, str | None]] = {}
        # a single-file SD checkpoint in the original layout answers to the pipeline's names per component
        self._ldm = ldm_layout(base.keys()) if base.kind == "file" else None

    def _ldm_index(self, component: str) -> dict[str, str | None]:
        key = f"ldm:{component}"
        if key not in self._indexes and self._ldm is not None:
            names = self._ldm.component_names(component)
            index = _name_index(list(names), component.startswith("text_"))
            # named as the pipeline names them, so convert writes pipeline adapters; merge finds the tensors
            named = {p: self._ldm.pipeline_names.get(path, path) for p, path in names.items()}
            self._indexes[key] = {n: named[p] if p else None for n, p in index.items()}
        return self._indexes.get(key, {})

    def _index(self, component: str | None) -> dict[str, str | None]:
        key = component or ""
        if key not in self._indexes:
            if component is None:
                self._indexes[key] = _name_index(_module_paths(self.base), True, self.base.config)
            elif component in self.base.components:
                reader = self.base.components[component]
                self._indexes[key] = _name_index(_module_paths(reader), component.startswith("text_"), reader.config)
            else:
                self._indexes[key] = {}
        return self._indexes[key]

    def resolve(self, name: str) -> str | None:
        m = _NAME.match(name)
        prefix = m.group(1) if m else ""
        rest = name[len(prefix) :]
        if self.base.kind == "pipeline":
            component = PREFIX_COMPONENT.get(prefix)
            found = self._index(component).get(rest) if component else None
            return f"{component}.{found}" if found else None
        if self._ldm is not None:
            component = PREFIX_COMPONENT.get(prefix)
            return self._ldm_index(component).get(rest) if component else None
        return self._index(None).get(rest)


@register_format
class KohyaFormat(AdapterFormat):
    name = "kohya"
    layout = "file"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        if not (path.is_file() and path.suffix == ".safetensors"):
            return False
        try:
            tensors, _ = read_header(path)
        except FormatError:
            return False
        if any(_NAME.match(k.partition(".")[0]) or k.startswith("diffusion_model.") for k in tensors):
            return True  # else a BFL/XLabs LoRA (read or refused by name), not a base in those names (no LoRA tensor)
        lora = any("lora" in k.lower() or k.endswith((".alpha", ".dora_scale")) or ".matrix_A." in k for k in tensors)
        return lora and original_layout(tensors) is not None

    @classmethod
    def read(cls, path: Path, base: KeyResolver | None = None) -> Adapter:
        tensors, metadata = load_file(path)
        found = original_layout(tensors)  # a diffusion-transformer file (Flux, Wan ...): read or refused by family
        if found is not None:
            from loratools.formats.dit.format import read_dit

            return read_dit(path, tensors, metadata, base, found)
        _refuse_layouts(path, list(tensors))
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            split = _split(key)
            if split is None:
                raise FormatError(
                    f"{path}: tensor {key!r} is not a kohya LoRA tensor (expected <lora_*>.lora_down.weight, "
                    ".lora_up.weight, .alpha or .dora_scale)",
                    path=path,
                )
            parts.setdefault(split[0], {})[split[1]] = t
        resolver = _Resolver(base) if base is not None else None
        modules: dict[str, LoraModule] = {}
        names: dict[str, str] = {}
        assumed: list[str] = []  # modules without an .alpha: alpha = rank (info says so)
        zero = 0  # LoRA modules whose .alpha is 0: the same, said (formats/alpha_values.py)
        for name, p in sorted(parts.items()):
            key = (resolver.resolve(name) if resolver else None) or name
            if "alpha" not in p:
                assumed.append(key)
            if LYCORIS_PARTS.intersection(p):
                if key in modules:
                    raise ValidationError(f"{path}: {name} and {names[key]} both resolve to module {key}", path=path)
                modules[key], names[key] = module_from_parts(path, name, p), name  # type: ignore[assignment]
                continue
            if "down" not in p or "up" not in p:
                missing = "lora_down.weight" if "down" not in p else "lora_up.weight"
                raise ValidationError(f"{path}: module {name} has no {missing} tensor", path=path)
            mod = _module(path, name, p)
            zero += "alpha" in p and p["alpha"].numel() == 1 and float(p["alpha"]) == 0
            if key in modules:
                raise ValidationError(f"{path}: {name} and {names[key]} both resolve to module {key}", path=path)
            modules[key], names[key] = mod, name
        return Adapter(
            modules=modules,
            meta={
                "format": "kohya",
                "base_model": metadata.get("ss_sd_model_name") or metadata.get("modelspec.architecture"),
                "metadata": metadata,
                "provenance": read_provenance(metadata),
                "kohya_names": names,
                "kohya_digest": content_digest(tensors),
                "alpha_assumed": assumed,
                "alpha_zero": warn_zero_alpha(path, zero, len(modules)),
                "files": [str(path)],
            },
        )

    @classmethod
    def write(
        cls,
        adapter: Adapter,
        path: Path,
        provenance: dict[str, Any] | None = None,
        kohya_prefix: str | None = None,
        **options: Any,
    ) -> None:
        tensors = kohya_tensors(adapter, kohya_prefix)
        metadata = {k: v for k, v in (adapter.meta.get("metadata") or {}).items() if k != METADATA_KEY}
        if adapter.format != "kohya":
            metadata = {}
        changed = adapter.meta.get("kohya_digest") != content_digest(tensors)
        if changed:
            metadata.update(_network_metadata(adapter))
            from loratools.formats.kohya.meta import network_args  # conv_dim/conv_alpha follow the tensors too

            args = network_args(adapter, metadata.pop("ss_network_args", None))
            if args is not None:
                metadata["ss_network_args"] = args
        if changed or "sshs_model_hash" not in metadata:
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sd_scripts_hashes(tensors, metadata)
        if provenance:
            metadata.update(provenance_metadata(provenance))
        save_file(tensors, str(path), metadata=metadata)


def _module(path: Path, name: str, p: dict[str, torch.Tensor]) -> LoraModule:
    down, up = p["down"], p["up"]
    rank = int(down.shape[0])
    alpha = read_alpha(path, name, p.get("alpha"))  # NaN/Inf/absurd refused: not taken for "no alpha"
    if alpha is None or alpha == 0:
        alpha = float(rank)  # kohya's rule: no alpha means scale 1
    magnitude = p.get("dora_scale")
    if magnitude is not None:
        if magnitude.numel() != up.shape[0] or magnitude.shape[0] != up.shape[0]:
            raise UnsupportedError(
                f"{path}: {name}.dora_scale has shape {tuple(magnitude.shape)}: only output-side (wd_on_out) "
                f"DoRA with {up.shape[0]} values is supported",
                path=path,
            )
        magnitude = magnitude.reshape(-1)
    kind = "conv" if down.ndim == 4 else "linear"
    try:
        return LoraModule(down=down, up=up, alpha=alpha, kind=kind, magnitude=magnitude)
    except ValidationError as exc:
        raise type(exc)(f"{path}: module {name}: {exc.message}", hint=exc.hint, path=path) from None


def _fifo(m: object) -> bool:
    return bool(getattr(m, "fan_in_fan_out", False))


def _normalize_prefix(prefix: str) -> str:
    if not re.fullmatch(r"lora_[a-z0-9]+_?", prefix):
        raise UsageError(f"kohya prefix {prefix!r} must look like lora_te_ or lora_unet_ (lowercase letters/digits)")
    return prefix if prefix.endswith("_") else prefix + "_"


def kohya_names(adapter: Adapter, kohya_prefix: str | None = None) -> dict[str, str]:
    """The kohya name of every module; UsageError/UnsupportedError listing modules that have none."""
    known = adapter.meta.get("kohya_names") or {}
    components = {n.split(".", 1)[0] for n in adapter.modules}
    te1 = "lora_te1_" if "text_encoder_2" in components else "lora_te_"
    prefix = _normalize_prefix(kohya_prefix) if kohya_prefix else None
    out: dict[str, str] = {}
    orphans: list[str] = []
    for name in adapter.modules:
        if name in known and adapter.format == "kohya":
            out[name] = known[name]
        elif _NAME.match(name):
            out[name] = name
        elif prefix is not None:  # a text encoder's paths get CLIP's text_model. root, as kohya names have it
            te = prefix.startswith("lora_te") and name.startswith(_TE_ROOTS)
            out[name] = prefix + _underscored("text_model." + name if te else name)
        else:
            component, _, rest = name.partition(".")
            if component == "unet":
                out[name] = "lora_unet_" + _underscored(rest)
            elif component in ("text_encoder", "text_encoder_2"):
                rest = "text_model." + rest if rest.startswith(_TE_ROOTS) else rest
                out[name] = (te1 if component == "text_encoder" else "lora_te2_") + _underscored(rest)
            else:
                orphans.append(name)
    if orphans:
        raise UsageError(
            f"{len(orphans)} module(s) have no kohya prefix (not unet./text_encoder./text_encoder_2. paths): "
            + name_list(orphans, 5),
            hint="pass --kohya-prefix (for example lora_te_ for a text encoder) to name them",
        )
    seen: dict[str, str] = {}
    for mod, kname in out.items():
        if kname in seen:
            raise UnsupportedError(f"modules {seen[kname]} and {mod} both become kohya name {kname}")
        seen[kname] = mod
    return out


def kohya_tensors(adapter: Adapter, kohya_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The kohya state dict for ``adapter``; refuses (listing modules) what kohya files cannot hold."""
    from loratools.formats.dit.format import dit_tensors

    if (dit := dit_tensors(adapter, "kohya")) is not None:  # Flux: lora_unet_ + the BFL names, projections fused
        return dit
    bad = [f"{n} (embedding)" for n, m in adapter.modules.items() if m.kind == "embedding"]
    bad += [f"{n} (lora_B bias)" for n, m in adapter.modules.items() if getattr(m, "bias", None) is not None]
    bad += [f"{n} (fan_in_fan_out / Conv1D layout)" for n, m in adapter.modules.items() if _fifo(m)]
    bad += [f"{k} (full replacement / modules_to_save)" for k in adapter.replacements]
    if bad:
        raise UnsupportedError(
            f"a kohya file cannot hold {len(bad)} part(s) of this adapter: " + name_list(bad, 6),
            hint="write peft instead (--to peft), or leave them out: "
            "loratools convert ADAPTER --to kohya --exclude REGEX -o OUT",
        )
    names = kohya_names(adapter, kohya_prefix)
    out: dict[str, torch.Tensor] = {}
    for mod, m in adapter.modules.items():
        k = names[mod]
        if not isinstance(m, LoraModule):
            out.update({f"{k}.{part}": t.contiguous() for part, t in family_parts(mod, m).items()})
            continue
        # rsLoRA's alpha/√r becomes kohya's alpha/r by folding √r into alpha
        alpha = float(m.alpha) * math.sqrt(m.rank) if m.use_rslora else float(m.alpha)
        out[f"{k}.lora_down.weight"] = m.down.contiguous()
        out[f"{k}.lora_up.weight"] = m.up.contiguous()
        out[f"{k}.alpha"] = alpha_tensor(alpha, m.down)
        if m.magnitude is not None:
            shape = (m.out_features, 1, 1, 1) if m.kind == "conv" else (m.out_features, 1)
            out[f"{k}.dora_scale"] = m.magnitude.reshape(shape).contiguous()
    return out


def _network_metadata(adapter: Adapter) -> dict[str, str]:
    ranks = adapter.ranks()
    alphas = {float(getattr(m, "alpha", 0) or 0) * (math.sqrt(m.rank) if getattr(m, "use_rslora", False) else 1.0)
              for m in adapter.modules.values()}
    lycoris = any(not isinstance(m, LoraModule) for m in adapter.modules.values())
    return {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }
