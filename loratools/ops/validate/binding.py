"""``validate --base``: do the adapter's module paths bind where it will run (:mod:`loratools.ops.bind`)?

loratools' merge resolves modules by the checkpoint's on-disk names; PEFT and servers (vLLM, SGLang) by
the module tree the model class builds. A vision-language wrapper's two differ, so an adapter can merge
and still bind nothing in PEFT or vLLM: reported with both counts and the prefix rewrite that fixes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter
    from loratools.ops.validate.findings import ValidationReport


def check_binding(adapter: Adapter, reader: CheckpointReader, report: ValidationReport) -> None:
    """An error when modules do not bind in the base's module tree and either a prefix rewrite makes them
    bind or loratools' merge would find them anyway (what binds differs by consumer); a warning for
    modules the adapter's own target_modules would also wrap there (a vision tower's ``q_proj``)."""
    from loratools.checkpoint.ldm_keymap import is_ldm
    from loratools.ops.bind import bind_report, fix_hint
    from loratools.ops.validate.serving import is_pipeline_adapter

    # a diffusion LoRA (kohya, diffusers, LyCORIS, ComfyUI) or an SD single file binds by the merge's own name
    # tables, not by a transformers module tree that PEFT or a server would build
    if is_pipeline_adapter(adapter, getattr(reader, "kind", None)) or not adapter.modules:
        return
    if getattr(reader, "kind", None) == "file" and is_ldm(reader.keys()):
        return
    try:
        bind = bind_report(adapter, reader)
    except Exception:  # noqa: BLE001 - the binding report is advice; the base checks below still run
        return
    report.binding = bind.to_dict()
    if bind.bound < bind.modules and (bind.mapping or bind.merge_bound > bind.bound):
        parts = [
            f"{bind.bound} of {bind.modules} modules bind to the {bind.tree_source} of {bind.base}, the names "
            "PEFT and vLLM/SGLang load adapters by (PEFT warns of missing adapter keys, vLLM serves the base "
            "model's output)"
        ]
        if bind.merge_bound != bind.bound:
            parts.append(
                f"loratools merge finds {bind.merge_bound} of {bind.modules} by the checkpoint's on-disk names"
            )
        if bind.first_unbound:
            parts.append(
                f"first: {bind.first_unbound}" + (f", the base has {bind.first_target}" if bind.first_target else "")
            )
        if bind.mapping and bind.bound_after > bind.bound:
            parts.append(f"{bind.bound_after} of {bind.modules} bind after {', '.join(bind.rewrites)}")
        hint = (
            fix_hint(report.path, str(report.base or bind.base), bind)
            if bind.mapping
            else "is this the base model the adapter was trained on?"
        )
        report.add("error", None, "unbound_modules", "; ".join(parts), hint=hint)
    if bind.extra_targets:
        n = len(bind.extra_targets)
        report.add(
            "warning",
            None,
            "extra_target_modules",
            f"the adapter's target_modules {adapter.meta['config'].get('target_modules')} also match {n} module(s) "
            f"of {bind.base} it holds no tensors for ({', '.join(bind.extra_targets[:3])}{', …' if n > 3 else ''}): "
            "PEFT wraps them too, at zero, and warns of missing adapter keys",
            hint=f"write full module paths: loratools convert {report.path} --for-base {report.base or bind.base} "
            "-o FIXED",
        )
