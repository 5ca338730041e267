"""``loratools bench``: latency of base, merged and LoRA-slot ONNX models against PyTorch eager."""

from __future__ import annotations

from typing import Any

import click

from loratools.args.numeric_args import NON_NEGATIVE_INT, POSITIVE_INT
from loratools.cli.options import Number, device_option, json_option
from loratools.cli.output import get_output, render_table


@click.command("bench")
@click.argument("model", type=str)
@click.option("--adapter", default=None, help="The adapter to merge / feed through LoRA slots.")
@device_option
@click.option(
    "--batch", "batches", type=Number(POSITIVE_INT), multiple=True, help="Batch size (repeatable; default 1)."
)
@click.option(
    "--seq", "seqs", type=Number(POSITIVE_INT), multiple=True, help="Sequence length (repeatable; default 128)."
)
@click.option("--repeats", type=Number(POSITIVE_INT), default=20, show_default=True, help="Timed runs per row.")
@click.option("--warmup", type=Number(NON_NEGATIVE_INT), default=3, show_default=True, help="Untimed runs first.")
@click.option("--work-dir", default=None, help="Keep the exported ONNX models here (default: a temporary folder).")
@json_option
@click.pass_context
def bench(
    ctx: click.Context,
    model: str,
    adapter: str | None,
    device: str,
    batches: tuple[int, ...],
    seqs: tuple[int, ...],
    repeats: int,
    warmup: int,
    work_dir: str | None,
    json_mode: bool,
) -> None:
    """Time MODEL as base ONNX, merged ONNX, LoRA-slots ONNX with the adapter active, PyTorch eager
    merged and PyTorch eager unmerged (PEFT): p50/p90 in milliseconds after warm-up, and the ratio to
    the merged ONNX model. Also times a full re-export against merging the adapter into the ONNX model.
    CPU exports fp32; --device cuda exports fp16 and needs onnxruntime-gpu (the onnx-gpu extra).

    \b
    Examples:
      loratools bench llama/ --adapter lora/
      loratools bench llama/ --adapter lora/ --batch 1 --batch 4 --seq 128 --json
    """
    from loratools.onnx.bench import bench as run_bench

    out = get_output(ctx, json_mode)
    result = run_bench(
        model, adapter, device=device, batches=batches or (1,), seqs=seqs or (128,), warmup=warmup,
        repeats=repeats, work_dir=work_dir, note=out.note,
    )  # fmt: skip
    out.result(result, _human)


def _human(d: dict[str, Any]) -> None:
    ref = next((k for k in d["rows"][0] if k.startswith("vs_")), "vs_base") if d["rows"] else "vs_base"
    rows = [[r["variant"], r["batch"], r["seq"], r["p50_ms"], r["p90_ms"], r.get(ref)] for r in d["rows"]]
    click.echo(render_table(["variant", "batch", "seq", "p50 ms", "p90 ms", ref.replace("_", " ")], rows))
    click.echo(f"export: {d['export_seconds']:.1f} s")
    if "merge_onnx_seconds" in d:
        click.echo(
            f"merge into ONNX: {d['merge_onnx_seconds']:.2f} s ({d['merge_speedup']:.0f}x faster than re-export)"
        )
