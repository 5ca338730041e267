"""``convert --base``: is the base the adapter's? The rule merge has, before a byte is written.

A diffusion-transformer file against a base of another family is refused by its reader already
(``formats/dit/flux_io.place``). Everything else is checked here, as merge checks it: what the adapter says it was
trained on against what the base is (:mod:`loratools.ops.base_match`), then whether any of its modules is in the
base at all, by merge's own resolution. A refusal is one line naming the family the file looks like and the family
of the base. A diffusers pipeline's component folder given where the pipeline is needed (``--to diffusers``, or an
adapter named by component, ``unet.…``), or a pipeline where one component's names are needed, gets a hint line
saying what to pass.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import UsageError, ValidationError

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter

_SD_FAMILIES = {"sd": "a Stable Diffusion 1/2 LoRA", "sdxl": "an SDXL LoRA", "sd3": "an SD3 LoRA",
                "flux": "a Flux LoRA"}  # fmt: skip
#: names of a Stable Diffusion UNet (diffusers' and the LDM originals'), in kohya or diffusers spelling
_UNET = re.compile(r"^(lora_unet_|unet\.)(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)")
_COMPONENT = re.compile(r"^(unet|transformer|text_encoder|text_encoder_2|text_encoder_3)\.")


def adapter_family(adapter: Adapter) -> str:
    """What the file looks like: ``a Flux LoRA in the diffusers layout``, ``an SDXL LoRA``, ``a LoRA for gpt2``."""
    dit = adapter.meta.get("dit")
    if dit:
        from loratools.formats.dit.layouts import DitLayout, describe

        return describe(DitLayout(dit["family"], dit["layout"], ""))
    from loratools.ops.base_match import claimed_base

    claim = claimed_base(adapter)
    if claim is not None and claim.sd_family in _SD_FAMILIES:
        return _SD_FAMILIES[claim.sd_family]
    names = list(adapter.modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "an SDXL LoRA"
    if any(_UNET.match(n) for n in names):
        return "a Stable Diffusion (UNet) LoRA"
    if claim is not None and claim.label:
        return f"a LoRA for {claim.label}"
    return f"a {adapter.format or 'LoRA'} adapter"


def base_label(reader: CheckpointReader) -> str:
    """What the base is: its transformer's or model's class (``a FluxTransformer2DModel pipeline``), a pipeline's
    own class where it has no transformer (``a StableDiffusionPipeline pipeline (unet, text_encoder, vae)``)."""
    from loratools.formats.dit.flux_io import base_family

    label = base_family(reader)
    index = getattr(reader, "index", None)
    if reader.kind == "pipeline" and "transformer" not in reader.components and isinstance(index, dict):
        cls = index.get("_class_name")
        if cls:
            return f"a {cls} pipeline ({', '.join(sorted(reader.components))})"
    return label


def _bound(adapter: Adapter, reader: CheckpointReader) -> int:
    """How many of the adapter's modules merge finds in ``reader`` (expert slices not counted: their names are
    parameters)."""
    from loratools.checkpoint.keymap import KeyMatcher, WeightTargets

    matcher, target = KeyMatcher(reader.keys()), WeightTargets(reader)
    judged = [n for n, m in adapter.modules.items() if not hasattr(m, "num_experts")]
    return sum(1 for n in judged if matcher.tensor_key(n) is not None or target(n)[1] is not None)


def _component_hint(adapter: Adapter, reader: CheckpointReader, shown: str) -> str | None:
    """A component folder where the pipeline is needed, or a pipeline where one component's names are: what to
    pass instead; None otherwise."""
    root = Path(str(reader.root))
    named_by_component = any(_COMPONENT.match(n) for n in adapter.modules)
    if reader.kind != "pipeline" and named_by_component:
        above = next((p for p in (root, *root.parents)[1:3] if (p / "model_index.json").is_file()), None)
        where = str(above) if above is not None else "the pipeline folder (the one with model_index.json)"
        return f"--base {shown} is one component's folder; the adapter's modules are named by component: pass {where}"
    one_model = all("." in n and not n.startswith(("lora_", "lycoris_")) for n in adapter.modules)  # not kohya names
    if reader.kind == "pipeline" and one_model and not named_by_component:
        comps = ", ".join(f"{root / c}" for c in sorted(reader.components)) or "its component folders"
        return (
            f"--base {shown} is a diffusers pipeline and the adapter's modules are one model's names: pass the "
            f"component's folder ({comps})"
        )
    return None


def require_base_family(
    adapter: Adapter, reader: CheckpointReader, label: str, shown: str, *, allow_other_base: bool = False
) -> None:
    """Refuse ``convert --base`` when the adapter says it was trained on another model (unless
    ``allow_other_base``, as merge takes it), or when none of its modules is in the base: one line naming the
    family the file looks like and the base's."""
    from loratools.ops.base_match import base_facts, claimed_base, mismatch

    judged = [n for n, m in adapter.modules.items() if not hasattr(m, "num_experts")]
    claim = claimed_base(adapter)
    differences = mismatch(claim, base_facts(reader, shown)) if claim is not None and not allow_other_base else []
    if not differences and (not judged or _bound(adapter, reader)):
        return
    why = (
        f"it says it was trained on {claim.label} ({'; '.join(differences)})"
        if differences and claim is not None
        else f"none of its {len(judged)} modules is in the base"
    )
    hint = _component_hint(adapter, reader, shown) if not differences else None
    raise ValidationError(
        f"{label}: this is {adapter_family(adapter)}, and {why}: --base {shown} is {base_label(reader)}",
        hint=hint or "pass the model or pipeline the adapter was trained on as --base (or convert without --base "
        "where the target format does not need one)"
        + ("; --allow-other-base converts it for this base anyway" if differences else ""),
    )


def require_pipeline(fmt: str, adapter: Adapter, reader: Any, shown: str) -> None:
    """``--to diffusers`` names modules by pipeline component: a component's folder as --base cannot give them."""
    if fmt != "diffusers" or reader is None or reader.kind == "pipeline":
        return
    if all(_COMPONENT.match(n) for n in adapter.modules):
        return
    root = Path(str(reader.root))
    above = next((p for p in (root, *root.parents)[1:3] if (p / "model_index.json").is_file()), None)
    raise UsageError(
        f"--to diffusers names modules by pipeline component (transformer.…, unet.…), and --base {shown} is one "
        "model's folder, not a diffusers pipeline",
        hint=f"pass the pipeline folder: --base {above}"
        if above is not None
        else "pass the diffusers pipeline folder (the one with model_index.json) as --base, or convert without --base",
    )
