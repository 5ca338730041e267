"""``loratools merge``: adapters merged into a base checkpoint, streamed tensor by tensor."""

from __future__ import annotations

from typing import Any

import click

from loratools.cli.options import (
    allow_alora_option,
    allow_other_base_option,
    device_option,
    dtype_option,
    filters,
    json_option,
    output_option,
    overwrite_option,
    parse_weights,
    trust_tensors_option,
    weights_option,
)
from loratools.cli.output import get_output


@click.command("merge")
@click.argument("base", type=str)
@click.argument("adapters", nargs=-1, required=True, type=str)
@output_option
@weights_option("Comma-separated weight per adapter (default 1 each; negative subtracts).")
@dtype_option
@click.option("--max-shard-size", default=None, help="Reshard the output (Hugging Face units: 5GB, 500MB, 2GiB).")
@device_option
@click.option("--verify", "run_verify", is_flag=True, help="Verify the output before publishing it.")
@overwrite_option
@trust_tensors_option
@allow_alora_option
@allow_other_base_option
@click.option(
    "--skip-module",
    "skip_modules",
    multiple=True,
    metavar="NAME",
    help="ONNX base only: leave out this adapter module, whose weight the graph does not hold (repeatable).",
)
@click.option(
    "--requantize",
    is_flag=True,
    help="Quantized base: write the base's own quantization back (bitsandbytes 4/8-bit, FP8, MXFP4, "
    "compressed-tensors int/NVFP4, MLX, ComfyUI fp8-scaled) instead of 16-bit, and report how much of each "
    "update survives (see docs/quantized.md).",
)
@click.option(
    "--reference",
    default=None,
    metavar="BASE16",
    help="Quantized base: the 16-bit model it was quantized from; reports |W16 - deq(Wq)| / |dW| per module "
    "and which base to merge into.",
)
@click.option(
    "--into",
    type=click.Choice(["base", "reference"]),
    default="base",
    show_default=True,
    help="Quantized base: merge into deq(Wq) (base) or into the --reference 16-bit model.",
)
@click.option(
    "--expand-base",
    is_flag=True,
    help="Flux control LoRA (Canny/Depth) into a plain Flux base: widen the base's img_in/x_embedder with zero "
    "columns to the LoRA's wider input (the control image's latent), merge into it and write the wider tensor; "
    "a pipeline or transformer folder gets in_channels in its config (and FluxControlPipeline in model_index.json).",
)
@filters
@json_option
@click.pass_context
def merge(
    ctx: click.Context,
    base: str,
    adapters: tuple[str, ...],
    output: str,
    weights: tuple[float, ...] | None,
    dtype: str,
    max_shard_size: str | None,
    device: str,
    run_verify: bool,
    overwrite: bool,
    include: str | None,
    exclude: str | None,
    json_mode: bool,
    trust_tensors: bool,
    allow_alora: bool,
    allow_other_base: bool,
    skip_modules: tuple[str, ...],
    requantize: bool,
    reference: str | None,
    into: str,
    expand_base: bool,
) -> None:
    """Merge ADAPTERS into the BASE checkpoint: W' = W + sum of weight * scale * B * A.

    BASE is a model folder (sharded or not, safetensors or .bin), a .safetensors file, a diffusers
    pipeline folder, an ONNX export or a GGUF model (llama.cpp's, or a ComfyUI-GGUF diffusion file: touched
    tensors keep their type; K/I-quants become F16), or a quantized checkpoint (bitsandbytes 4/8-bit, FP8, GPTQ,
    AWQ, MXFP4, compressed-tensors int/NVFP4, MLX, ComfyUI fp8-scaled: merged into its dequantized weights and
    written in 16-bit, or requantized). Expert LoRAs merge into per-expert or fused 3-D MoE checkpoints.
    Tensors no adapter touches are copied byte for byte; memory stays at about one tensor. Tied embeddings
    are untied when an adapter changes one side.

    \b
    Examples:
      loratools merge base/ adapter/ -o merged/
      loratools merge base/ style/ detail/ --weights 1,-0.5 -o merged/ --verify
      loratools merge base/ adapter/ -o merged/ --dtype bf16 --max-shard-size 2GB
      loratools merge model-Q8_0.gguf adapter/ -o merged.gguf --verify
      loratools merge flux1-dev-Q8_0.gguf flux-lora.safetensors -o merged.gguf
      loratools merge flux1-dev.safetensors kohya-flux-lora.safetensors -o flux1-dev-merged.safetensors
      loratools merge FLUX.1-dev/ flux1-canny-dev-lora.safetensors -o flux1-canny/ --expand-base
      loratools merge gpt-oss-20b/ expert-lora/ -o merged/
      loratools merge model-bnb-4bit/ qlora/ -o merged/ --reference model-bf16/
      loratools merge model-bnb-4bit/ qlora/ -o merged-4bit/ --requantize
    """
    from loratools.ops.merge import MergeOptions
    from loratools.ops.merge import merge as run_merge

    out = get_output(ctx, json_mode)
    options = MergeOptions(
        weights=parse_weights(weights, len(adapters)),
        dtype=dtype,
        max_shard_size=max_shard_size,
        device=device,
        verify=run_verify,
        overwrite=overwrite,
        trust_tensors=trust_tensors,
        allow_alora=allow_alora,
        allow_other_base=allow_other_base,
        skip_modules=list(skip_modules),
        include=include,
        exclude=exclude,
        requantize=requantize,
        reference=reference,
        into=into,
        expand_base=expand_base,
        progress=lambda total: out.progress_callback(total, "merging"),
    )
    summary = run_merge(base, list(adapters), output, options)
    out.result(summary.to_dict() if hasattr(summary, "to_dict") else dict(summary), _human)


def _human(d: dict[str, Any]) -> None:
    from loratools.publishing.publish import format_bytes

    extra = " (verified)" if d.get("verified") else ""
    untied = f", untied {', '.join(d['untied'])}" if d.get("untied") else ""
    n = d.get("tensors_changed")  # base tensors: a fused qkv or an expert tensor takes several adapter modules
    if n is not None:
        what = f"{n} base tensor{'' if n == 1 else 's'} changed"
    else:  # an ONNX model counts the adapter modules it applied
        what = f"{d['modules_merged']} adapter module{'' if d['modules_merged'] == 1 else 's'} applied"
    click.echo(
        f"merged into {d['output']}: {what}, {format_bytes(d['bytes_written'])} written in {d['seconds']:.1f} s"
        f"{untied}{extra}"
    )
    left = d.get("left_out") or []
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        click.echo(f"left out {len(left)} file(s) that hold the base's unmerged weights: {shown}")
    for module, reason in (d.get("skipped") or {}).items():
        click.echo(f"skipped {module}: {reason}")
    if d.get("quantized_base"):
        from loratools.cli.quant_render import render_quant_report

        render_quant_report(d["quantized_base"])
    for note in d.get("notes") or []:
        click.echo(f"note: {note}")
    retyped = d.get("retyped") or []
    if retyped:
        click.echo(
            f"{len(retyped)} K/I-quant tensor(s) changed by the adapters are written as F16 (the gguf package "
            f"cannot re-quantize them; llama.cpp's llama-export-lora does the same): {', '.join(retyped[:3])}"
            + (" ..." if len(retyped) > 3 else "")
        )
