"""``validate`` for the families beyond LoRA: dtypes, config against tensors, identity (no-op) updates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.families import FamilyModule
    from loratools.model.adapter import Adapter
    from loratools.ops.validate.findings import ValidationReport


def warn_negative_alpha(report: ValidationReport, name: str, alpha: float) -> None:
    """A negative alpha is read as it is (sd-scripts, ComfyUI and PEFT multiply by it: the update is subtracted),
    but no trainer writes one: said."""
    report.add(
        "warning",
        name,
        "negative_alpha",
        f"module {name}: alpha is {alpha:g}, so its update is subtracted (applied with the opposite sign); "
        "trainers write a positive alpha",
        hint="to subtract an adapter on purpose, keep its alpha positive and merge with a negative weight: "
        "loratools merge BASE ADAPTER -o OUT --weights -1",
    )


def check_family_module(adapter: Adapter, name: str, m: FamilyModule, report: ValidationReport) -> None:
    """One LoHa/LoKr/OFT/BOFT/IA3/diag-OFT module on its own."""
    import torch

    tensors = m.tensors()
    for role, t in tensors.items():
        if not t.is_floating_point():
            dt = str(t.dtype).removeprefix("torch.")
            report.add("error", name, "dtype", f"module {name}: {role} is {dt}; adapter tensors must be floating point")
            return
    alpha, scale = getattr(m, "alpha", None), m.scale
    if isinstance(alpha, int | float) and alpha < 0 and scale is not None and scale < 0:  # LoKr of full halves: 1
        warn_negative_alpha(report, name, alpha)
    if _identity(m, torch):
        report.add(
            "warning",
            name,
            "zero_delta",
            f"module {name}: the {m.label} update is the identity, so the module changes nothing "
            "(PEFT initializes this family to the identity: an untrained adapter?)",
        )
    cfg = adapter.meta.get("config")
    if adapter.format == "peft" and isinstance(cfg, dict):
        problem = _config_disagrees(name, m, cfg)
        if problem:
            report.add(
                "error",
                name,
                "config_rank",
                f"module {name}: {problem}",
                hint="the config and the tensors disagree; re-save the adapter with PEFT",
            )


def _identity(m: Any, torch: Any) -> bool:
    t = m.tensors()
    if any(v.is_meta for v in t.values()):  # a huge tensor left in its file (validate/streamed.py): not judged
        return False
    if m.family == "loha":
        return not (bool(t["hada_w1_a"].any()) and bool(t["hada_w2_b"].any()) and bool(t["hada_w2_a"].any()))
    if m.family == "lokr":
        return any(not bool(v.any()) for k, v in t.items() if k != "dora_scale")
    if m.family in ("oft", "diag_oft"):
        w = t.get("oft_R.weight", t.get("oft_blocks"))
        skew = w if m.family == "oft" else w - w.transpose(1, 2)
        return not bool(skew.any()) and (t.get("rescale") is None or bool((t["rescale"] == 1).all()))
    if m.family == "boft":
        r = t["boft_R"]
        return not bool((r - r.transpose(-1, -2)).any()) and bool((t["boft_s"] == 1).all())
    if m.family == "ia3":
        return bool((t["ia3_l"] == 1).all())
    return False


def _config_disagrees(name: str, m: Any, cfg: dict[str, Any]) -> str | None:
    from loratools.formats.peft.families import _pattern_value

    if m.family == "loha":
        declared = int(_pattern_value(cfg, "rank_pattern", name, cfg.get("r", 8)))
        if declared != m.rank:
            return f"adapter_config.json declares rank {declared} but hada_w1_b has {m.rank} rows"
    if m.family == "oft" and not m.block_share:  # PEFT's own rule, sizes that do not divide adjusted as it does
        from loratools.formats.peft.config_checks import oft_block_problem

        return oft_block_problem(cfg, int(m.n_blocks), m.block_size)
    return None
