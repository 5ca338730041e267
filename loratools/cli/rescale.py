"""``loratools rescale``: change an adapter's strength exactly, or normalize its alpha."""

from __future__ import annotations

import click

from loratools.args.numeric_args import POSITIVE, SCALE
from loratools.cli.options import (
    Number,
    json_option,
    kohya_prefix_option,
    output_option,
    overwrite_option,
    trust_tensors_option,
)
from loratools.cli.output import get_output


@click.command(short_help="Multiply an adapter's effect by a factor, or set alpha keeping the delta.")
@click.argument("adapter")
@click.option(
    "--scale",
    type=Number(SCALE),
    default=None,
    help="Multiply every module's effect on the model by this (exact; DoRA and modules_to_save need --base).",
)
@click.option(
    "--alpha", type=Number(POSITIVE), default=None, help="Set every module's alpha; B is rebalanced so ΔW is kept."
)
@click.option("--to", "to", default=None, help="Output format (default: the input's).")
@click.option(
    "--base",
    type=str,
    default=None,
    help="The model the adapter is for (folder, diffusers pipeline or .gguf): resolves kohya names when --to "
    "leaves kohya; a --to gguf file is written for it; with --scale, DoRA and modules_to_save modules become "
    "exact plain LoRA of W' - W against it (a Hugging Face folder).",
)
@kohya_prefix_option
@output_option
@overwrite_option
@trust_tensors_option
@json_option
@click.pass_context
def rescale(
    ctx: click.Context,
    adapter: str,
    scale: float | None,
    alpha: float | None,
    to: str | None,
    output: str,
    overwrite: bool,
    trust_tensors: bool,
    base: str | None,
    kohya_prefix: str | None,
    json_mode: bool,
) -> None:
    """Rescale ADAPTER: --scale S multiplies its effect W' - W by S (alpha becomes |S|·alpha, bit-exact);
    --alpha A sets alpha to A and rebalances B so ΔW is unchanged.

    A DoRA module's merged weight renormalizes W + ΔW, and a modules_to_save tensor replaces W: neither
    effect scales with ΔW, so --scale refuses them without --base, and with --base (the Hugging Face model
    folder) turns them into exact plain LoRA of W' - W (full rank if needed) before scaling.

    \b
    Examples:
      loratools rescale adapter/ --scale 0.5 -o half/
      loratools rescale dora-adapter/ --scale 0.5 --base model/ -o half/
      loratools rescale adapter/ --alpha 16 -o normalized/ --json
      loratools rescale style.safetensors --scale 0.8 --to diffusers --base sdxl-pipeline/ -o style/
    """
    from loratools.ops.rescale import rescale as run

    out = get_output(ctx, json_mode)
    ad = run(
        adapter,
        scale=scale,
        alpha=alpha,
        output=output,
        to=to,
        overwrite=overwrite,
        trust_tensors=trust_tensors,
        base=base,
        kohya_prefix=kohya_prefix,
    )
    data = {
        "output": output,
        "format": to or ad.format,
        "modules": len(ad.modules),
        "scale": scale,
        "alpha": alpha,
        "alphas": sorted(ad.alphas()),
        "lowered": ad.meta.get("lowered") or [],
    }

    def human(d: dict) -> None:
        click.echo(f"wrote {d['output']}: {d['modules']} modules, alphas {d['alphas'][:6]}")
        if d["lowered"]:
            click.echo(f"{len(d['lowered'])} DoRA / modules_to_save module(s) became exact plain LoRA of W' - W "
                       "against --base before scaling")

    out.result(data, human)
