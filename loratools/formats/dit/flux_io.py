"""Diffusion-transformer LoRA files in a family's original naming (Flux, Wan, Qwen-Image; each family's names are
its table, :mod:`.tables`): kohya/sd-scripts/musubi ``lora_unet_double_blocks_0_img_attn_qkv``, ComfyUI
``diffusion_model.blocks.0.self_attn.q`` and the bare original names (BFL, DiffSynth-Studio) (parts
``lora_down.weight``/``lora_A.weight``, ``lora_up.weight``/``lora_B.weight``, ``alpha``), read and written.

Read, a module is named as the base names it: with no base, a diffusers pipeline or a bare transformer folder,
the diffusers names (``transformer.transformer_blocks.0.attn.to_q``; fused modules split, :mod:`..flux`); with an
original-layout single file, that file's own names (``model.diffusion_model.double_blocks.0.img_attn.qkv``;
fused modules kept, diffusers-named parts fused). kohya's alpha rule holds per module: scale = alpha/rank, a
missing or zero alpha means alpha = rank (sd-scripts ``networks/lora_flux.py``, musubi-tuner ``networks/lora.py``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, ShapeError, UnsupportedError, ValidationError
from loratools.formats.dit import flux
from loratools.formats.dit.layouts import LABELS, DitLayout, describe, transformer_class
from loratools.formats.dit.tables import table_for
from loratools.model.adapter import LoraModule
from loratools.model.fused import fuse, split, swap_halves

if TYPE_CHECKING:
    import torch

    from loratools.formats.registry import KeyResolver

_PARTS = {
    "lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
    "lora_A.default.weight": "down", "lora_B.default.weight": "up", "alpha": "alpha",
}  # fmt: skip
_COMFY = ("model.diffusion_model.", "diffusion_model.")
#: kohya text-encoder prefixes of Flux files -> the Flux pipeline component (CLIP-L, T5-XXL)
TEXT_PREFIX = {"lora_te1_": "text_encoder", "lora_te_": "text_encoder", "lora_te3_": "text_encoder_2"}
_TEXT_BACK = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}
#: the same for the families whose text encoders differ (SD3, sd-scripts ``lora_sd3.py``: CLIP-L, CLIP-G, T5-XXL)
_FAMILY_TEXT = {"sd3": {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"},
                # one text encoder, lora_te_: sd-scripts lora_lumina.py (Gemma2); CogVideoX-Fun (T5); Z-Image (Qwen3)
                "lumina2": {"lora_te_": "text_encoder"}, "z_image": {"lora_te_": "text_encoder"},
                "cogvideox": {"lora_te_": "text_encoder"}, "hidream": {}}  # fmt: skip


def text_prefix(family: str) -> dict[str, str]:
    """kohya text-encoder prefix -> pipeline component for ``family``."""
    return _FAMILY_TEXT.get(family, TEXT_PREFIX)
_TE_ROOTS = ("encoder.", "embeddings.", "final_layer_norm")


def _split_key(path: Path, key: str, found: DitLayout) -> tuple[str, str, bool]:
    """``(module, part, text_encoder)`` of one tensor name; FormatError naming it when it is none."""
    table, label = table_for(found.family), found.label
    name, part = None, None
    for suffix, role in _PARTS.items():
        if key.endswith("." + suffix):
            name, part = key[: -len(suffix) - 1], role
            break
    if name is None or part is None:
        what = key.rsplit(".", 2)[-2:] if "." in key else [key]
        if any(w in ("dora_scale",) for w in what):
            raise UnsupportedError(f"{path}: {key!r} is DoRA (dora_scale) on {label}, which loratools does not read "
                                   "yet", path=path)  # fmt: skip
        if any(w.startswith(("hada_", "lokr_", "oft_")) for w in what):
            raise UnsupportedError(f"{path}: {key!r} is a LyCORIS LoHa/LoKr/OFT tensor on {label}, which loratools "
                                   "does not read yet", path=path)  # fmt: skip
        if what[-1] in ("diff", "diff_b"):
            raise UnsupportedError(f"{path}: {key!r} is a full-weight difference (.diff/.diff_b, as lightx2v's "
                                   "distilled LoRAs carry), which loratools does not read yet", path=path)  # fmt: skip
        raise FormatError(
            f"{path}: tensor {key!r} is not a {label} LoRA tensor (expected <module>.lora_down.weight / "
            "lora_A.weight, .lora_up.weight / lora_B.weight or .alpha)",
            path=path,
        )
    if found.layout == "kohya":
        for prefix in text_prefix(found.family):
            if name.startswith(prefix):
                return name, part, True
        bfl = table.from_kohya(name.removeprefix("lora_unet_")) if name.startswith("lora_unet_") else None
    else:
        bare = next((name[len(p) :] for p in _COMFY if name.startswith(p)), name)
        bfl = bare if table.to_diffusers(bare) is not None else None
    if bfl is None:
        raise FormatError(f"{path}: tensor {key!r} names no {label} module ({table.EXAMPLES})", path=path)
    return bfl, part, False


def _module(
    path: Path, name: str, p: dict[str, torch.Tensor], family: str = "Flux", conv: bool = False
) -> LoraModule:  # fmt: skip
    """``conv``: the module is a Conv2d (SD3's ``x_embedder.proj``): 4-D factors allowed, down k×k, up 1×1."""
    conv = conv and all(role in p and p[role].ndim == 4 for role in ("down", "up"))
    for role, label in (("down", "lora_down (A)"), ("up", "lora_up (B)")):
        if role not in p:
            raise ValidationError(f"{path}: {family} module {name} has no {label} tensor", path=path)
        if p[role].ndim != 2 and not conv:
            raise ShapeError(f"{path}: {name} {label} is {tuple(p[role].shape)}; a {family} LoRA factor is 2-D",
                             path=path)  # fmt: skip
    alpha_t = p.get("alpha")
    if alpha_t is not None and alpha_t.numel() != 1:
        raise FormatError(f"{path}: {name}.alpha has {alpha_t.numel()} values; expected a scalar", path=path)
    alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None and not alpha_t.is_meta else None
    if alpha is not None and not math.isfinite(alpha):
        raise FormatError(f"{path}: {name}.alpha is {alpha}", hint="the file is damaged; re-export it", path=path)
    rank = int(p["down"].shape[0])
    try:
        return LoraModule(down=p["down"], up=p["up"], alpha=float(rank) if not alpha else alpha,
                          kind="conv" if conv else "linear")
    except ValidationError as exc:
        raise type(exc)(f"{path}: module {name}: {exc.message}", hint=exc.hint, path=path) from None


def read_bfl_named(
    path: Path, tensors: dict[str, torch.Tensor], found: DitLayout
) -> tuple[dict[str, LoraModule], dict[str, LoraModule], list[str]]:
    """``(transformer modules by original path, text-encoder modules by kohya name, modules without an alpha)``."""
    parts: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    from loratools.model.finite import require_finite

    for key, t in tensors.items():
        name, part, text = _split_key(path, key, found)
        if not t.is_floating_point():  # checked here, under the file's own names, before any split renames them
            raise FormatError(f"{path}: tensor {key} is {t.dtype}; LoRA tensors must be floating point", path=path)
        if not t.is_meta:
            require_finite(t, key, path)
        slot = parts.setdefault((name, text), {})
        if part in slot:
            raise ValidationError(f"{path}: module {name} has two {part} tensors (one is {key!r})", path=path)
        slot[part] = t
    modules: dict[str, LoraModule] = {}
    text: dict[str, LoraModule] = {}
    assumed = []
    for (name, is_text), p in sorted(parts.items()):
        m = _module(path, name, p, found.label, name in getattr(table_for(found.family), "CONV", ()))
        (text if is_text else modules)[name] = m
        if "alpha" not in p:
            assumed.append(name)
        if not is_text:
            _check_fused(path, name, m, table_for(found.family))
    return modules, text, assumed


def _check_fused(path: Path, name: str, m: LoraModule, table: Any) -> None:
    rows = table.part_rows(name, m.out_features, m.in_features)
    if rows is None or (swapped(table, name, m) and m.out_features % 2):
        want = "3·D+MLP rows for D inputs" if name.endswith("linear1") else "an even row count" \
            if swapped(table, name, m) else "a multiple of 3 rows"  # fmt: skip
        label = LABELS.get(table.FAMILY, table.FAMILY)
        raise ShapeError(f"{path}: {name} lora_up (B) has {m.out_features} rows for {m.in_features} inputs; "
                         f"the fused {label} weight has {want}", path=path)  # fmt: skip


def swapped(table: Any, name: str, m: LoraModule) -> bool:
    """Whether original module ``name`` holds its two row halves in the other order than its diffusers twin (a
    table's ``swapped`` rule where it has one, SD3's depends on the shape; else its one ``SWAPPED`` module)."""
    rule = getattr(table, "swapped", None)
    return bool(rule(name, m.out_features, m.in_features)) if rule is not None else name == table.SWAPPED


def split_to_diffusers(path: Path, modules: dict[str, LoraModule], table: Any = flux) -> dict[str, LoraModule]:
    """Original-named modules -> diffusers-named ones (Flux: fused modules split, ``norm_out`` halves swapped)."""
    out: dict[str, LoraModule] = {}
    for name, m in modules.items():
        targets = table.to_diffusers(name) or ()
        if len(targets) == 1:
            out[targets[0]] = swap_halves(m) if swapped(table, name, m) else m
            continue
        rows = table.part_rows(name, m.out_features, m.in_features) or []
        for target, piece in zip(targets, split(m, rows, f"{path}: {name}"), strict=True):
            if piece is not None:
                out[target] = piece
    return out


def fuse_to_bfl(modules: dict[str, LoraModule], rows_of: Any = None, table: Any = flux) -> dict[str, LoraModule]:
    """Diffusers-named modules (no component prefix) -> original-named ones; ``rows_of(bfl) -> list`` gives a fused
    tensor's part rows when a base knows them (else siblings and ``flux.MLP_RATIO`` do)."""
    groups: dict[str, dict[int, LoraModule]] = {}
    counts: dict[str, int] = {}
    label = LABELS.get(table.FAMILY, table.FAMILY)
    for name, m in modules.items():
        target = table.to_original(name)
        if target is None:
            raise UnsupportedError(f"module {name} is not a {label} transformer module; it has no original-layout "
                                   "name")  # fmt: skip
        bfl, index, count = target
        groups.setdefault(bfl, {})[index] = m
        counts[bfl] = count
    out: dict[str, LoraModule] = {}
    for bfl, parts in groups.items():
        if counts[bfl] == 1:
            m = parts[0]
            out[bfl] = swap_halves(m) if swapped(table, bfl, m) else m
            continue
        width = next(iter(parts.values())).in_features
        rows = rows_of(bfl) if rows_of else None
        if rows is None:
            known = {i: p.out_features for i, p in parts.items()}
            rows = [known.get(i) or table.missing_part_rows(bfl, i, width, known) for i in range(counts[bfl])]
        out[bfl] = fuse([parts.get(i) for i in range(counts[bfl])], rows, f"module {bfl}")
    return out


# -- the base -------------------------------------------------------------------------------------------------
def bfl_prefix(base: KeyResolver | None, table: Any = flux) -> str | None:
    """The prefix of an original-layout single file's names (``""``, ``model.diffusion_model.``), else None."""
    if base is None or base.kind != "file":
        return None
    probe = table.PROBE
    for k in base.keys():
        m = probe.match(k)
        if m:
            return m.group(1)
    return None


#: diffusers transformer class -> family, for the files whose names several families share (below)
_CLASSES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
            "HunyuanVideoTransformer3DModel": "hunyuan_video"}  # fmt: skip


def base_dit_family(base: KeyResolver | None) -> str | None:
    """Flux, SD3 or HunyuanVideo when ``base`` is one (its transformer's class, or an original-layout single file's
    marker tensor), else None."""
    if base is None:
        return None
    cls = transformer_class(base)
    if cls in _CLASSES:
        return _CLASSES[cls]
    return next((f for f in ("sd3", "hunyuan_video", "flux") if bfl_prefix(base, table_for(f)) is not None), None)


def shared_names(found: DitLayout, base: KeyResolver | None, metadata: dict[str, str]) -> DitLayout:
    """A kohya file on attention and single-block linears only has names Flux and HunyuanVideo share
    (``lora_unet_double_blocks_0_img_attn_qkv``): musubi-tuner's ``modelspec.architecture`` or the base tells it."""
    if found.family != "flux" or found.layout != "kohya":
        return found
    if metadata.get("modelspec.architecture", "").startswith("hunyuan-video") or base_dit_family(base) == (
        "hunyuan_video"
    ):
        return DitLayout("hunyuan_video", found.layout, found.example)
    return found


def base_family(base: KeyResolver) -> str:
    """What the base is, for a refusal (``a Flux diffusers pipeline``, ``an SD/SDXL pipeline (unet)``)."""
    from loratools.formats.dit.layouts import family_of

    if base.kind == "pipeline":
        comp = base.components.get("transformer")
        cls = (comp.config or {}).get("_class_name") if comp is not None else None
        if cls:
            return f"a {cls} pipeline"
        return f"a pipeline without a transformer (components {', '.join(sorted(base.components)) or 'none'})"
    cls = (base.config or {}).get("_class_name") or (base.config or {}).get("model_type")
    if cls:
        return f"a {cls} model"
    keys = base.keys()
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "a Stable Diffusion (UNet) single file"
    for family in ("sd3", "hunyuan_video", "wan", "qwen_image", "flux"):  # a single file's own marker tensor first
        if bfl_prefix(base, table_for(family)) is not None:  # (SD3's final_layer would read as Flux's below)
            return f"{'an' if family == 'sd3' else 'a'} {LABELS[family]} checkpoint"
    for k in keys[:2000]:
        f = family_of(k)
        if f:
            return f"a {LABELS[f]} checkpoint"
    return "a checkpoint of another architecture"


def place(
    path: Path, found: DitLayout, bfl: dict[str, LoraModule] | None, diffusers: dict[str, LoraModule] | None,
    base: KeyResolver | None,
) -> dict[str, LoraModule]:  # fmt: skip
    """Modules named as ``base`` names them (see the module docstring); refuses a base they cannot bind to."""
    table = table_for(found.family)
    if base is None:
        named = diffusers if diffusers is not None else split_to_diffusers(path, bfl or {}, table)
        return {f"transformer.{k}": m for k, m in named.items()}
    split = table.split_prefix(base.keys()) if base.kind == "file" and hasattr(table, "split_prefix") else None
    if split is not None:  # a single file in diffusers' names (Z-Image's Tongyi names): merged under them
        named = diffusers if diffusers is not None else split_to_diffusers(path, bfl or {}, table)
        return {split + k: m for k, m in named.items()}
    prefix = bfl_prefix(base, table)
    if prefix is not None:
        if bfl is not None and any(getattr(table, "is_alias", lambda _: False)(k) for k in bfl):
            diffusers, bfl = split_to_diffusers(path, bfl, table), None  # Z-Image's split names: fused as the file is
        if bfl is None:
            shapes = base

            def rows_of(name: str) -> list[int] | None:
                key = f"{prefix}{name}.weight"
                if key not in shapes.keys():
                    return None
                out, inp = (int(s) for s in shapes.info(key).shape[:2])
                return table.part_rows(name, out, inp)

            bfl = fuse_to_bfl(diffusers or {}, rows_of, table)
        return {prefix + k: m for k, m in bfl.items()}
    named = diffusers if diffusers is not None else split_to_diffusers(path, bfl or {}, table)
    if base.kind == "pipeline" and "transformer" not in base.components:
        _refuse_base(path, found, base)
    # kohya/musubi names resolve against the transformer (a pipeline's transformer/ component), never a unet; a
    # transformer of another family shares a few names (proj_out): most of the modules must bind
    sample = list(named)[:50]
    hits = sum(1 for k in sample if base.tensor_key(f"transformer.{k}"))
    if hits * 2 < len(sample):
        _refuse_base(path, found, base, hits, len(sample))
    return {f"transformer.{k}": m for k, m in named.items()}


def _refuse_base(path: Path, found: DitLayout, base: KeyResolver, hits: int = 0, tried: int = 0) -> None:
    some = f"only {hits} of {tried} of its modules are" if hits else "none of its modules is"
    raise ValidationError(
        f"{path}: this is {describe(found)}, and {some} in the base {getattr(base, 'root', '')} ({base_family(base)})",
        hint=f"merge it into a {found.label} diffusers pipeline folder, its transformer/ folder or an original-layout "
        f"{found.label} single file",
        path=path,
    )


def text_names(text: dict[str, LoraModule], base: KeyResolver | None, family: str = "flux") -> dict[str, LoraModule]:
    """Text-encoder modules (kohya names) resolved against a pipeline's text encoders; kept as they are else."""
    if base is None or base.kind != "pipeline":
        return dict(text)
    out = {}
    for name, m in text.items():
        prefixes = text_prefix(family)
        prefix = next(p for p in prefixes if name.startswith(p))
        component = prefixes[prefix]
        reader = base.components.get(component)
        index: dict[str, str] = {}
        for k in reader.keys() if reader is not None else []:
            if k.endswith(".weight"):
                mod = k[: -len(".weight")]
                index.setdefault(mod.replace(".", "_"), mod)
                index.setdefault(("text_model." + mod).replace(".", "_"), mod)
        found = index.get(name[len(prefix) :])
        out[f"{component}.{found}" if found else name] = m
    return out


def kohya_text_name(name: str, family: str = "flux") -> str | None:
    """The kohya name of a Flux pipeline's text-encoder module (``text_encoder.encoder.layers.0...``), else None."""
    component, _, rest = name.partition(".")
    back = {c: p for p, c in text_prefix(family).items()} if family in _FAMILY_TEXT else _TEXT_BACK
    if component not in back:
        return None
    if component == "text_encoder" and rest.startswith(_TE_ROOTS):
        rest = "text_model." + rest
    return back[component] + rest.replace(".", "_")


__all__ = ["base_family", "bfl_prefix", "fuse_to_bfl", "place", "read_bfl_named", "split_to_diffusers"]
