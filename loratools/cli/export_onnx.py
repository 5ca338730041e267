"""``loratools export-onnx``: a checkpoint (optionally merged with adapters) as an ONNX model."""

from __future__ import annotations

from typing import Any

import click

from loratools.args.numeric_args import Range
from loratools.cli.options import (
    Number,
    allow_alora_option,
    json_option,
    output_option,
    overwrite_option,
    parse_weights,
    trust_tensors_option,
    weights_option,
)
from loratools.cli.output import get_output
from loratools.onnx import MAX_OPSET, MIN_OPSET


@click.command("export-onnx")
@click.argument("model", type=str)
@output_option
@click.option("--adapter", "adapters", multiple=True, help="Merge this adapter first (repeatable).")
@weights_option("Comma-separated weight per --adapter (default 1 each).")
@click.option(
    "--opset",
    type=Number(Range(low=MIN_OPSET, high=MAX_OPSET, integer=True)),
    default=None,
    help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: torch.onnx's).",
)
@click.option(
    "--dtype", type=click.Choice(["fp32", "fp16"]), default=None, help="fp32 (CPU, default) or fp16 (default on cuda)."
)
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime-vs-PyTorch check.")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Export and verify here."
)
@click.option("--lora-slots", default=None, help="Add LoRA slot inputs for every module this adapter targets.")
@overwrite_option
@trust_tensors_option
@allow_alora_option
@json_option
@click.pass_context
def export_onnx(
    ctx: click.Context,
    model: str,
    output: str,
    adapters: tuple[str, ...],
    weights: tuple[float, ...] | None,
    opset: int | None,
    dtype: str | None,
    no_verify: bool,
    device: str,
    lora_slots: str | None,
    overwrite: bool,
    json_mode: bool,
    trust_tensors: bool,
    allow_alora: bool,
) -> None:
    """Export MODEL (a Hugging Face folder) to OUTPUT/model.onnx with its weights in one
    model.onnx.data file, config and tokenizer files copied. Inputs input_ids, attention_mask (and
    token_type_ids for BERT-like models), int64 with dynamic batch and sequence; output logits or
    last_hidden_state; no past key values. Every weight keeps its checkpoint name. onnxruntime is
    checked against PyTorch on sample inputs (fp32: max difference 1e-4); a failed check exits 1 and
    writes nothing. --lora-slots makes a multi-LoRA graph for onnxruntime's LoraAdapter.

    \b
    Examples:
      loratools export-onnx llama/ -o llama-onnx/
      loratools export-onnx llama/ --adapter lora-a/ --adapter lora-b/ --weights 1,0.5 -o merged-onnx/
      loratools export-onnx llama/ --lora-slots lora-a/ -o slots-onnx/
      loratools export-onnx llama/ --device cuda --dtype fp16 -o llama-onnx-fp16/
    """
    from loratools.onnx.export import export_onnx as run_export

    out = get_output(ctx, json_mode)
    result = run_export(
        model,
        output,
        adapters=list(adapters),
        weights=parse_weights(weights, len(adapters)) if adapters or weights else None,
        opset=opset,
        dtype=dtype or ("fp16" if device == "cuda" else "fp32"),
        device=device,
        verify=not no_verify,
        overwrite=overwrite,
        trust_tensors=trust_tensors,
        allow_alora=allow_alora,
        lora_slots=lora_slots,
    )
    out.result(result.to_dict(), _human)


def _human(d: dict[str, Any]) -> None:
    extra = f", {len(d['merged'])} modules merged" if d["merged"] else ""
    extra += f", {len(d['slots'])} LoRA slots" if d["slots"] else ""
    click.echo(
        f"wrote {d['output']}/model.onnx ({d['task']}, {d['dtype']}, opset {d['opset']}{extra}) in {d['seconds']:.1f} s"
    )
    for module, reason in (d.get("skipped") or {}).items():
        click.echo(f"no LoRA slot for {module}: {reason}")
    if d["verified"]:
        click.echo(f"verified: max |onnxruntime - PyTorch| = {d['max_diff']:.3g} (allowed {d['atol']:.3g})")
    else:
        click.echo("not verified (--no-verify)")
