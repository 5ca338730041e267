"""What a plain (unquantized-layout) base tensor's dtype allows a merge to write: an integer tensor is refused
(it is packed or quantized data, never a weight to add to), and a float8 weight without a scale is written as
BF16, since e4m3's three mantissa bits round most of a LoRA update away (ComfyUI's ``flux1-dev-fp8`` kind)."""

from __future__ import annotations

from loratools.checkpoint.reader import CheckpointReader
from loratools.errors import UnsupportedError
from loratools.files.safetensors_file import FLOAT_DTYPES
from loratools.ops.merge.plan import MergePlan

FLOAT8 = ("F8_E4M3", "F8_E5M2")


def settle_base_dtypes(reader: CheckpointReader, plan: MergePlan, out_dtype: str | None) -> list[str]:
    """Check every tensor the plan changes against its base dtype; returns the notes for the summary.

    Quantized bases (``reader.quant``) are dequantized by their own scheme and are not looked at here."""
    if reader.quant is not None:
        return []
    widened = []
    for key, job in plan.jobs.items():
        if job.is_copy or job.source is None or job.replacement is not None:
            continue
        dtype = reader.info(job.source).dtype
        if dtype not in FLOAT_DTYPES:
            module = (job.deltas or job.biases)[0].module if (job.deltas or job.biases) else key
            raise UnsupportedError(
                f"{reader.file_of(job.source)}: base tensor {job.source} is {dtype}, not a float weight; "
                f"adapter module {module} cannot be merged into it",
                hint="a quantized or packed checkpoint needs its quantization files beside it "
                "(config.json's quantization_config, scales); or merge into the unquantized base",
            )
        if dtype in FLOAT8 and out_dtype is None:
            job.dtype = "BF16"
            widened.append(job.source)
    if not widened:
        return []
    shown = ", ".join(widened[:3]) + (f" and {len(widened) - 3} more" if len(widened) > 3 else "")
    return [
        f"{len(widened)} float8 tensor(s) without a scale changed by the adapters are written as BF16 (rounding "
        f"them back to float8 would lose most of the update): {shown}; --dtype casts every tensor instead"
    ]
