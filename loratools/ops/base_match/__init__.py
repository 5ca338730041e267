"""Was this adapter trained on this base? One rule for ``merge``, ``validate --base`` and ``combine``.

What an adapter says about its base (its *claim*): the model name (PEFT ``base_model_name_or_path``,
diffusers' config, kohya ``ss_sd_model_name``), PEFT's ``auto_mapping.base_model_class``, kohya's
``modelspec.architecture`` / ``ss_base_model_version``; and, when the name resolves to a folder here (as
written, from the working directory or from a folder above the adapter's) or to a ``config.json`` in the
Hugging Face cache (offline, nothing is downloaded), that config's ``model_type``, ``architectures`` and
sizes. What a base says about itself: its ``config.json`` (or a pipeline's ``model_index.json``), the
names it goes by (its path, its Hub id, the config's ``_name_or_path``, and for a merged output of ours
the base its provenance record names, whose config stands in when the output has none).

The rule (:func:`mismatch`): no claim, no check. A name both sides share means the same model, whatever
else differs (a converted copy under the original's name). Otherwise only facts both sides state are
compared, and any that differ is a definite mismatch: ``model_type`` (the base's or its ``text_config``'s),
the architecture class family when a side has no ``model_type`` (``Qwen2ForCausalLM`` -> qwen2), hidden
size, layer count, intermediate size, attention and key/value head counts, and the Stable Diffusion
family (sd / sdxl / sd3 / flux). Vocabulary size is not compared (a resized vocabulary is legitimate), nor
are names that merely differ (a fine-tune, a local copy of a Hub model, a quantized copy: all keep the
facts). A mismatch is a ``ValidationError`` naming both sides and the override, ``--allow-other-base``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratools.errors import ValidationError
from loratools.ops.base_match.facts import SIZE_KEYS, ModelFacts, base_facts, claimed_base, norm

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter

__all__ = [
    "OVERRIDE", "ModelFacts", "base_facts", "base_mismatch_error", "claimed_base", "mismatch", "require_base",
    "require_same_base",
]  # fmt: skip

OVERRIDE = "--allow-other-base"


def _agree(a: set[str], b: set[str]) -> bool:
    return any(x == y or x.startswith(y) or y.startswith(x) for x in a for y in b)


def mismatch(claim: ModelFacts | None, base: ModelFacts) -> list[str]:
    """The facts on which ``claim`` and ``base`` definitely differ (empty: no evidence they are different)."""
    if claim is None or claim.names & base.names:
        return []
    found = []
    if claim.model_types and base.model_types:
        if not {norm(t) for t in claim.model_types} & {norm(t) for t in base.model_types}:
            found.append(f"model_type {'/'.join(sorted(claim.model_types))} vs {'/'.join(sorted(base.model_types))}")
    elif claim.families or claim.model_types:
        mine = claim.families | {norm(t) for t in claim.model_types}
        theirs = base.families | {norm(t) for t in base.model_types}
        if theirs and not _agree(mine, theirs):
            found.append(f"architecture {'/'.join(sorted(mine))} vs {'/'.join(sorted(theirs))}")
    for size in SIZE_KEYS:
        a, b = claim.sizes.get(size), base.sizes.get(size)
        if a and b and a != b:
            found.append(f"{size} {a} vs {b}")
    if claim.sd_family and base.sd_family and claim.sd_family != base.sd_family:
        found.append(f"{claim.sd_family} vs {base.sd_family}")
    return found


def base_mismatch_error(label: str, claim: ModelFacts, base: ModelFacts, differences: list[str]) -> ValidationError:
    return ValidationError(
        f"{label} was trained on {claim.label}, not on the base {base.label}: {'; '.join(differences)}",
        hint=f"use the base model the adapter was trained on; if this base is right (a renamed or converted "
        f"copy), pass {OVERRIDE}",
    )


def require_base(
    adapters: Sequence[Adapter], labels: Sequence[str], reader: CheckpointReader, spec: str | Path | None = None
) -> None:
    """A ``ValidationError`` for the first adapter whose claim definitely differs from the base."""
    claims = [claimed_base(a) for a in adapters]
    if not any(claims):
        return
    base = base_facts(reader, spec)
    for claim, label in zip(claims, labels, strict=True):
        differences = mismatch(claim, base)
        if claim is not None and differences:
            raise base_mismatch_error(label, claim, base, differences)


def require_same_base(adapters: Sequence[Adapter], labels: Sequence[str]) -> None:
    """Adapters whose claims definitely differ from each other are not combined (the same rule, pairwise)."""
    claims = [(lab, claimed_base(a)) for lab, a in zip(labels, adapters, strict=True)]
    known = [(lab, c) for lab, c in claims if c is not None]
    for i, (lab_a, a) in enumerate(known):
        for lab_b, b in known[i + 1 :]:
            differences = mismatch(a, b)
            if differences:
                raise ValidationError(
                    f"the adapters were trained on different base models: {lab_a} is for {a.label}; "
                    f"{lab_b} is for {b.label} ({'; '.join(differences)})",
                    hint=f"combine adapters of one base model; if both fit one model, pass --base MODEL "
                    f"(each is checked against it) or {OVERRIDE}",
                )


def missing_module_hint(
    module: str,
    reader: CheckpointReader,
    otherwise: str = "check that the adapter was trained on this base model, or skip the module with --exclude",
    shape: tuple[int, ...] | None = None,
) -> str:
    """The hint for an adapter module the base lacks: a diffusers LoRA (``unet.…``) given one component's
    folder needs the pipeline folder above it; a prefix rewrite that gives it a weight (of ``shape``, when
    known) says so; anything else ``otherwise``."""
    from pathlib import Path

    from loratools.formats.diffusers import COMPONENTS

    component, dot, _ = module.partition(".")
    root = Path(reader.root)
    above = [p for p in (root, *root.parents)[:3] if (p / "model_index.json").is_file()]
    # a diffusers component folder (its config says _diffusers_version), not a transformers model such as GPT-2,
    # whose own modules start with transformer.
    component_folder = reader.kind == "folder" and "_diffusers_version" in (reader.config or {})
    if dot and component in COMPONENTS and reader.kind != "pipeline" and (component_folder or above):
        where = f" ({above[0]})" if above else ""
        return (
            f"the adapter's modules are named by pipeline component ({component}.…): its base is the diffusers "
            f"pipeline folder, the one with model_index.json{where}, not one component's folder"
        )
    from loratools.ops.bind import disk_fix

    fix = disk_fix(module, reader, shape)
    if fix is not None:  # a prefix the adapter's trainer added or dropped (llm., a VLM wrapper's language_model.)
        return (
            f"the base names it {fix[1]}: rewrite the prefix ({fix[0]}): loratools convert ADAPTER --for-base "
            f"{root} -o FIXED (or --remap-prefix {fix[0].old}={fix[0].new})"
        )
    return otherwise
