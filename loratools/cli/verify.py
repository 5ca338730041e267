"""``loratools verify``: prove a merged checkpoint holds exactly the adapters."""

from __future__ import annotations

from typing import Any

import click

from loratools.cli.options import filters, json_option, parse_weights, trust_tensors_option, weights_option
from loratools.cli.output import get_output


@click.command("verify")
@click.argument("merged", type=str)
@click.option("--base", required=True, help="The base checkpoint the adapters were merged into.")
@click.option("--adapter", "adapters", multiple=True, required=True, help="An adapter (repeat for several, in order).")
@weights_option()
@click.option(
    "--expand-base",
    is_flag=True,
    help="MERGED came from merge --expand-base: widen BASE's img_in/x_embedder as that merge did.",
)
@filters
@trust_tensors_option
@json_option
@click.pass_context
def verify(
    ctx: click.Context,
    merged: str,
    base: str,
    adapters: tuple[str, ...],
    weights: tuple[float, ...] | None,
    include: str | None,
    exclude: str | None,
    trust_tensors: bool,
    expand_base: bool,
    json_mode: bool,
) -> None:
    """Check that MERGED equals BASE plus the adapters, tensor by tensor, within the dtype's rounding.

    Works on any tool's merge. Each failure is named: not applied, scaling mismatch, sign flipped,
    transposed, partial rank, tied weight changed, untouched tensor changed, below dtype precision.
    Exit 0 verified, 1 failed.

    \b
    Examples:
      loratools verify merged/ --base base/ --adapter adapter/
      loratools verify merged/ --base base/ --adapter a/ --adapter b/ --weights 1,0.5 --json
      loratools verify merged/ --base base/ --adapter adapter/ --include 'self_attn'
      loratools verify flux1-canny/ --base FLUX.1-dev/ --adapter flux1-canny-dev-lora.safetensors --expand-base
    """
    from loratools.ops.verify import verify as run_verify

    out = get_output(ctx, json_mode)
    report = run_verify(
        merged, base, list(adapters), weights=parse_weights(weights, len(adapters)),
        include=include,
        exclude=exclude,
        trust_tensors=trust_tensors,
        expand_base=expand_base,
    )
    out.result(report.to_dict(), _human)
    if not report.verified:
        ctx.exit(1)


def _human(d: dict[str, Any]) -> None:
    if d["verified"]:
        click.echo(f"verified: {d['modules_checked']} modules, {d['tensors_checked']} tensors match")
        return
    click.echo(f"FAILED: {len(d['failures'])} of {d['tensors_checked']} tensors")
    for f in d["failures"]:
        ratio = f" (ratio {f['ratio']:.4g})" if f.get("ratio") not in (None, 0.0, -1.0) else ""
        click.echo(f"  {f['tensor']}: {f['status'].replace('_', ' ')}{ratio}: {f['detail']}")
