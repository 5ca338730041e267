"""``validate --base``: every module resolves to a float base weight of the shape it expects."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter
    from loratools.ops.validate.findings import ValidationReport


_WHICH_BASE = "is this the base model the adapter was trained on?"


def check_claimed_base(
    adapter: Adapter, reader: CheckpointReader, base: str | Path, report: ValidationReport, allow: bool
) -> None:
    """What the adapter says it was trained on against what the base is (:mod:`loratools.ops.base_match`)."""
    from loratools.ops.base_match import OVERRIDE, base_facts, base_mismatch_error, claimed_base, mismatch

    claim = claimed_base(adapter)
    if claim is None:
        return
    facts = base_facts(reader, base)
    differences = mismatch(claim, facts)
    if differences:
        err = base_mismatch_error(report.path, claim, facts, differences)
        if allow:
            report.add("warning", None, "base_mismatch", f"{err.message} (accepted: {OVERRIDE})")
        else:
            report.add("error", None, "base_mismatch", err.message, hint=err.hint)


def check_against_base(adapter: Adapter, reader: CheckpointReader, report: ValidationReport) -> None:
    """Every module resolves to a float base weight of the shape it expects; the base is not quantized."""
    from loratools.checkpoint.keymap import KeyMatcher, WeightTargets, same_matrix
    from loratools.model.tied import tied_source
    from loratools.ops.base_match import missing_module_hint

    quant = reader.quantization
    if quant:
        report.add(
            "error",
            None,
            "base_quantized",
            f"{reader.root}: the base is quantized ({quant}); loratools cannot merge into it",
            hint="validate and merge against the unquantized (fp32/fp16/bf16) base model",
        )
    from loratools.checkpoint.expert_keymap import lower_experts
    from loratools.errors import LoratoolsError

    try:  # expert slices: the base's per-expert modules, or experts of its fused (E, d1, d2) tensors
        adapter = lower_experts(adapter, reader)
    except LoratoolsError as exc:
        report.add("error", None, "expert_layout", exc.args[0] if exc.args else str(exc), hint=exc.hint)
        return
    from loratools.ops.validate.binding import check_binding

    check_binding(adapter, reader, report)  # the names PEFT and servers bind to (a VLM wrapper's module tree)
    matcher = KeyMatcher(reader.keys())
    target = WeightTargets(reader)  # a module may be a part of a fused tensor (an LDM file's OpenCLIP in_proj)
    replaced = {}
    for key, t in adapter.replacements.items():
        mod, _, suffix = key.rpartition(".")
        bkey = matcher.tensor_key(mod, suffix)
        if bkey is None and suffix == "weight":
            bkey = tied_source(reader, mod)  # a tied output head: the base stores it as the input embedding
        if bkey is None:
            report.add("error", mod, "unresolved", f"full tensor {key} has no counterpart in the base {reader.root}")
            continue
        replaced[bkey] = tuple(t.shape)
        bshape = tuple(reader.info(bkey).shape)
        if bshape != tuple(t.shape):
            report.add(
                "warning",
                mod,
                "replacement_shape",
                f"full tensor {key} has shape {list(t.shape)}, the base's {bkey} has {list(bshape)} "
                "(a resized vocabulary?)",
            )
    stacked = {n: m.parameter for n, m in adapter.modules.items() if hasattr(m, "num_experts")}  # (E, d1, d2)
    unresolved = [
        n
        for n in adapter.modules
        if n not in stacked
        and matcher.tensor_key(n) is None
        and target(n)[1] is None
        and tied_source(reader, n) is None
    ]
    if len(unresolved) > 1 and len(unresolved) == len(adapter.modules):
        report.add(
            "error",
            None,
            "unresolved",
            f"none of the adapter's {len(unresolved)} modules has a weight in the base {reader.root} "
            f"(first: {sorted(unresolved)[0]}.weight)",
            hint=(
                f"{reader.root} is an adapter, not a base model; pass the model the adapter was trained on"
                if Path(reader.root, "adapter_config.json").exists()
                else missing_module_hint(sorted(unresolved)[0], reader, _WHICH_BASE)
            ),
        )
        return
    for name, m in sorted(adapter.modules.items()):
        bkey, rows = stacked.get(name) or matcher.tensor_key(name), None
        if bkey is None:
            fused, rows = target(name)
            bkey = fused if rows else None
        if bkey is None:
            bkey = tied_source(reader, name)
        if bkey is None:
            report.add(
                "error",
                name,
                "unresolved",
                f"module {name}: no weight {name}.weight (or a prefixed variant) in the base {reader.root}",
                hint=missing_module_hint(name, reader, _WHICH_BASE, getattr(m, "weight_shape", None)),
            )
            continue
        bi = reader.info(bkey)
        if not bi.is_float:
            report.add(
                "error",
                name,
                "base_not_float",
                f"module {name}: base weight {bkey} in {reader.file_of(bkey).name} is {bi.dtype} "
                "(quantized/packed); it cannot be merged into",
                hint="use the unquantized base model",
            )
            continue
        have = replaced.get(bkey, tuple(bi.shape))
        if name in stacked:  # one expert of the stack
            have = have[1:]
        if rows:
            have = (rows[1] - rows[0], *have[1:])
        if not hasattr(m, "down"):  # another family: its own fit rule
            problem = m.misfit(have)
            if problem:
                report.add("error", name, "shape_mismatch", f"module {name} ({m.label}) {problem} ({bkey})",
                           hint="the adapter was trained on a different base model")
            continue
        want = tuple(m.weight_shape)
        if have != want and (getattr(m, "transposed", False) or not same_matrix(want, have)):
            hint = None
            if len(want) == 2 and have == want[::-1]:
                hint = "the base stores this weight transposed; the adapter's fan_in_fan_out setting disagrees"
            else:
                from loratools.ops.merge.widen import widen_advice

                hint = widen_advice(bkey, want, have).removeprefix("; ") or None  # a control LoRA: --expand-base
            report.add(
                "error",
                name,
                "shape_mismatch",
                f"module {name}: expects a base weight of shape {list(want)} but {bkey} in "
                f"{reader.file_of(bkey).name} has shape {list(have)}",
                hint=hint or "the adapter was trained on a different base model",
            )
