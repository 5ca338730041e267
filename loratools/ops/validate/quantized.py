"""``validate --base QUANT_BASE [--reference BASE16]``: what a quantized base is, and which base to merge into.

A readable quantized base (bitsandbytes, FP8, GPTQ, AWQ) is no error: its scheme, bits, block sizes and
quantized tensors are reported. With ``--reference`` (the 16-bit model it was quantized from) each module
gets ‖W16 − deq(Wq)‖ / ‖ΔW‖: how far a merge into the 16-bit base would land from the weights a QLoRA
adapter was trained against, in units of the update itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import LoratoolsError

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter
    from loratools.ops.validate.findings import ValidationReport


def check_quantized_base(
    adapter: Adapter, reader: CheckpointReader, reference: str | Path | None, report: ValidationReport
) -> None:
    """Fill ``report.quantized_base`` (and a warning when the 16-bit base is far from deq(Wq))."""
    import torch

    from loratools.checkpoint.reader import open_checkpoint
    from loratools.ops.merge.quant_report import GAP_LARGE, ModuleRow, QuantReport, gap_ratio

    if reader.quant is None:
        report.add(
            "error",
            None,
            "reference_needs_quantized_base",
            f"--reference compares a quantized base with its 16-bit original; {reader.root} is not a quantized "
            "base loratools reads",
            hint="pass the bitsandbytes/FP8/GPTQ/AWQ checkpoint with --base and the 16-bit model with --reference",
        )
        return
    report.findings = [f for f in report.findings if f.code != "base_quantized"]  # readable: no error
    check_quant_states(reader, report)
    summary = reader.quant.summary()
    brief = {k: v for k, v in summary.items() if k != "quantized"}
    q = QuantReport(reader.quant.scheme, "none", "quantized", brief)
    keys = {name: f"{name}.weight" for name in adapter.modules if f"{name}.weight" in reader.quant.tensors}
    if reference is not None:
        try:
            ref = open_checkpoint(reference)
        except LoratoolsError as exc:
            report.add("error", None, "reference_unreadable", exc.message, hint=exc.hint)
            ref = None
        if ref is not None:
            with ref:
                for name, key in sorted(keys.items()):
                    m = adapter.modules[name]
                    if key not in ref or tuple(ref.info(key).shape) != tuple(reader.quant.tensors[key].shape):
                        report.add(
                            "error",
                            name,
                            "reference_mismatch",
                            f"--reference {ref.root} has no tensor {key} of shape "
                            f"{list(reader.quant.tensors[key].shape)}",
                            hint="give the 16-bit model this checkpoint was quantized from",
                        )
                        continue
                    delta = m.delta(torch.float32)
                    norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
                    gap = gap_ratio(ref.get(key).float(), reader.quant.get(key, torch.float32), norm)
                    q.rows.append(ModuleRow(key, reader.quant.scheme, norm, gap=gap))
    data = q.to_dict()
    data["quantized"] = summary["quantized"]
    data["adapter_modules_on_quantized_weights"] = len(keys)
    report.quantized_base = data
    med = data.get("median_gap")
    if med is not None and med >= GAP_LARGE:
        worst = ", ".join(r.key for r in q.worst("gap", 3))
        report.add(
            "warning",
            None,
            "reference_far_from_trained_base",
            f"the 16-bit base differs from the weights the adapter was trained against (deq(Wq)) by {med:.3g}x "
            f"the update (median; largest: {worst}): merging into it changes more than the adapter does",
            hint="merge into the quantized base: loratools merge QUANT_BASE ADAPTER -o OUT (deq(Wq) + dW, 16-bit)",
        )


def check_quant_states(reader: CheckpointReader, report: ValidationReport) -> None:
    """Every quantized module's state values, as a merge checks them before dequantizing: float parts finite,
    scales within the weight dtype's range, GPTQ ``g_idx`` inside its groups. (Shapes and settings were
    checked when the base was opened.) The packed weights themselves are not read: a merge checks those."""
    from loratools.checkpoint.quant import checks

    q = reader.quant
    for key, t in sorted(q.tensors.items()):
        try:
            checks.check_values(t, q.read_parts(t, skip=("weight", "qweight", "qzeros")), q.part_namer(t))
        except LoratoolsError as exc:
            report.add("error", key.removesuffix(".weight"), "quant_state", exc.message, hint=exc.hint)
