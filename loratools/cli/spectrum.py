"""``loratools spectrum``: singular values, effective rank and energy ranks per module."""

from __future__ import annotations

import click

from loratools.cli.options import json_option, overwrite_option, trust_tensors_option
from loratools.cli.output import get_output


@click.command(short_help="Singular values per module, effective rank, ranks for 90/95/99% energy.")
@click.argument("adapter")
@click.option(
    "--plot",
    type=click.Path(path_type=str),
    default=None,
    help="Write retained-energy curves to this PNG (needs the 'plot' extra).",
)
@overwrite_option
@trust_tensors_option
@json_option
@click.pass_context
def spectrum(
    ctx: click.Context, adapter: str, plot: str | None, overwrite: bool, trust_tensors: bool, json_mode: bool
) -> None:
    """Show the spectrum of every module's ΔW (from the factors): sigma_max, effective rank and the
    smallest ranks keeping 90/95/99% of the energy, to choose a rank for resize.

    \b
    Examples:
      loratools spectrum adapter/
      loratools spectrum adapter/ --plot energy.png --json
    """
    from loratools.ops.spectrum import spectrum as run

    out = get_output(ctx, json_mode)
    data = run(adapter, plot=plot, overwrite=overwrite, trust_tensors=trust_tensors)

    def human(d: dict) -> None:
        out.table(
            ["module", "rank", "sigma max", "eff. rank", "r90", "r95", "r99"],
            [
                (
                    m["name"],
                    m["rank"],
                    m["singular_values"][0] if m["singular_values"] else 0.0,
                    f"{m['effective_rank']:.2f}",
                    m["energy_ranks"]["0.9"],
                    m["energy_ranks"]["0.95"],
                    m["energy_ranks"]["0.99"],
                )
                for m in d["modules"]
            ],
        )
        s = d["summary"]
        out.line(
            f"{s['modules']} modules; rank needed for 90/95/99% energy in every module: "
            f"{s['max_rank_0.9']}/{s['max_rank_0.95']}/{s['max_rank_0.99']}"
        )
        if d.get("plot"):
            out.line(f"wrote {d['plot']}")

    out.result(data, human)
