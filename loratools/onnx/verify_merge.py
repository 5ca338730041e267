"""What merge-into-ONNX does with the options of a checkpoint merge, and its ``--verify``.

A checkpoint merge can cast (``--dtype``), reshard (``--max-shard-size``) and compute on a GPU
(``--device``); merging into an ONNX graph keeps every weight's stored dtype, writes one data file and
computes on the CPU, so those options are refused there rather than ignored. ``--verify`` is honoured:
every patched weight is read back from the written data file and compared with base + update.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import UsageError, VerificationError

if TYPE_CHECKING:
    from loratools.onnx.store import InitializerSource


def refuse_checkpoint_options(dtype: str | None, max_shard_size: str | int | None, device: str | None) -> None:
    """UsageError for a checkpoint-merge option that has no meaning for an ONNX graph."""
    if dtype not in (None, "auto"):
        raise UsageError(
            f"--dtype {dtype}: merging into an ONNX model keeps every weight's stored dtype",
            hint="leave --dtype out, or export the model in that dtype: "
            "`loratools export-onnx MODEL --dtype fp16 -o OUT`",
        )
    if max_shard_size:
        raise UsageError(
            "--max-shard-size: merging into an ONNX model writes one model.onnx.data file",
            hint="leave --max-shard-size out",
        )
    if device not in (None, "cpu"):
        raise UsageError(
            f"--device {device}: merging into an ONNX model computes on the CPU",
            hint="leave --device out (cpu)",
        )


def verify_patched(
    source: InitializerSource, out_file: Path, plan: dict[str, list[Any]], weights: Sequence[float]
) -> float:
    """Worst error of the patched weights read back from ``out_file`` against base + Σ weight·scale·B·A.

    The error of one element is |written - (base + update)| over the rounding its stored dtype allows
    (a few units in the last place of |base| + |update|, plus fp32 accumulation); above 1 anywhere
    raises VerificationError. Returns the worst ratio.
    """
    import torch

    from loratools.onnx.store import InitializerSource, load_graph

    written_proto = load_graph(out_file)
    written = {t.name: t for t in written_proto.graph.initializer}
    reader = InitializerSource(out_file)
    base_tensors = {t.name: t for t in source_proto_initializers(source)}
    worst = 0.0
    try:
        for name, entries in plan.items():
            base = source.tensor(base_tensors[name]).to(torch.float32)
            update = torch.zeros_like(base)
            for site, module, number in entries:  # the dense ΔW, not the writer's in-place factor update
                if module.kind == "embedding":
                    update += module.delta() * weights[number]
                    continue
                up, down = module.factors()
                delta = (up * (module.scale * weights[number])) @ down  # (out, in)
                update += delta.T if site.layout == "in_out" else delta
            got = reader.tensor(written[name])
            eps = torch.finfo(got.dtype).eps if got.dtype.is_floating_point else 0.0
            expected = base + update
            allowed = 2 * eps * (base.abs() + update.abs()) + 64 * torch.finfo(torch.float32).eps * float(
                update.abs().max()
            )
            ratio = float(((got.to(torch.float32) - expected).abs() / allowed.clamp_min(1e-30)).max())
            if not ratio <= 1.0:  # also catches NaN
                raise VerificationError(
                    f"{out_file}: weight {name} read back differs from base + update by "
                    f"{float((got.to(torch.float32) - expected).abs().max()):.3g} "
                    f"({ratio:.3g}x the rounding its dtype allows); nothing was published",
                    hint="report this with the model and adapter; the merge wrote a wrong weight",
                )
            worst = max(worst, ratio)
    finally:
        reader.close()
    return worst


def source_proto_initializers(source: InitializerSource) -> list[Any]:
    """The initializers of the source model (graph only, weights stay on disk)."""
    from loratools.onnx.store import load_graph

    return list(load_graph(source.model_file).graph.initializer)
