"""``loratools rescale``: change an adapter's strength exactly, or normalize its alpha."""

from __future__ import annotations

import click

from ..numeric_args import POSITIVE, SCALE
from .options import Number, output_option, overwrite_option
from .output import get_output


@click.command(short_help="Multiply every delta by a factor, or set alpha keeping the delta.")
@click.argument("adapter")
@click.option("--scale", type=Number(SCALE), default=None, help="Multiply every module's delta by this (exact).")
@click.option(
    "--alpha", type=Number(POSITIVE), default=None, help="Set every module's alpha; B is rebalanced so ΔW is kept."
)
@click.option("--to", "to", default=None, help="Output format (default: the input's).")
@output_option
@overwrite_option
@click.pass_context
def rescale(
    ctx: click.Context,
    adapter: str,
    scale: float | None,
    alpha: float | None,
    to: str | None,
    output: str,
    overwrite: bool,
) -> None:
    """Rescale ADAPTER: --scale S multiplies every ΔW by S (alpha becomes |S|·alpha, bit-exact);
    --alpha A sets alpha to A and rebalances B so ΔW is unchanged.

    \b
    Examples:
      loratools rescale adapter/ --scale 0.5 -o half/
      loratools rescale adapter/ --alpha 16 -o normalized/
    """
    from ..ops.rescale import rescale as run

    out = get_output(ctx)
    ad = run(adapter, scale=scale, alpha=alpha, output=output, to=to, overwrite=overwrite)
    out.line(f"wrote {output}: {len(ad.modules)} modules, alphas {sorted(ad.alphas())[:6]}")
