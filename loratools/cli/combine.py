"""``loratools combine``: one adapter from several (exact cat, best rank-R svd, linear, ties, dare)."""

from __future__ import annotations

import click

from loratools.args.numeric_args import FRACTION, NON_NEGATIVE_INT
from loratools.cli.options import (
    Number,
    allow_other_base_option,
    base_option,
    json_option,
    kohya_prefix_option,
    output_option,
    overwrite_option,
    parse_weights,
    rank_option,
    trust_tensors_option,
    weights_option,
)
from loratools.cli.output import get_output

_METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")


@click.command(short_help="Combine adapters: exact weighted sum (cat), best rank-R (svd), linear, ties, dare.")
@click.argument("adapters", nargs=-1, required=True)
@weights_option("Comma-separated weights, one per adapter (default 1 each).")
@click.option("--method", type=click.Choice(_METHODS), default="cat", show_default=True, help="How to combine.")
@rank_option("Output rank for svd/ties/dare (default: largest input rank).")
@click.option("--density", type=Number(FRACTION), default=None, help="Fraction of entries kept by ties/dare.")
@click.option(
    "--seed", type=Number(NON_NEGATIVE_INT), default=0, show_default=True, help="Seed of dare's random drops."
)
@base_option
@click.option("--to", "to", default=None, help="Output format (default: the first input's).")
@kohya_prefix_option
@output_option
@overwrite_option
@trust_tensors_option
@allow_other_base_option
@json_option
@click.pass_context
def combine(
    ctx: click.Context,
    adapters: tuple[str, ...],
    weights: tuple[float, ...] | None,
    method: str,
    rank: int | None,
    density: float | None,
    seed: int,
    base: str | None,
    to: str | None,
    output: str,
    overwrite: bool,
    trust_tensors: bool,
    allow_other_base: bool,
    kohya_prefix: str | None,
    json_mode: bool,
) -> None:
    """Combine ADAPTERS with weights. cat is the exact weighted sum (ranks add up); svd is the best
    rank-R approximation of it; linear (equal ranks) adds cross terms like PEFT's; ties/dare_linear/
    dare_ties act on each module's exact delta and re-factor it to rank R (seeded, deterministic).

    \b
    Examples:
      loratools combine style/ subject/ --weights 0.7,1.0 -o both/
      loratools combine a/ b/ c/ --method svd --rank 16 -o merged16/
      loratools combine a/ b/ --method dare_ties --density 0.5 --seed 1 -o mixed/
    """
    from loratools.ops.combine import combine as run

    out = get_output(ctx, json_mode)
    w = parse_weights(weights, len(adapters))
    ad = run(
        list(adapters),
        weights=w,
        method=method,
        rank=rank,
        density=density,
        seed=seed,
        base=base,
        output=output,
        to=to,
        overwrite=overwrite,
        trust_tensors=trust_tensors,
        kohya_prefix=kohya_prefix,
        allow_other_base=allow_other_base,
    )
    data = {
        "output": output,
        "format": to or ad.format,
        "method": method,
        "modules": len(ad.modules),
        "ranks": sorted(ad.ranks()),
        "replacements": sorted(ad.replacements),
    }
    out.result(data, _human)


def _human(d: dict) -> None:
    click.echo(f"wrote {d['output']}: {d['modules']} modules ({d['method']}), ranks {d['ranks']}")
