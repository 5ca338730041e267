"""``loratools resize``: new ranks by truncating each module's exact SVD (computed from the factors)."""

from __future__ import annotations

import click

from loratools.args.numeric_args import AT_LEAST_ONE, FRACTION, NON_NEGATIVE_INT, POSITIVE_INT
from loratools.cli.options import (
    Number,
    json_option,
    kohya_prefix_option,
    output_option,
    overwrite_option,
    rank_option,
    resolve_base_option,
    trust_tensors_option,
)
from loratools.cli.output import get_output


@click.command(short_help="Shrink ranks: best rank-R, Frobenius/ratio/cumulative rules or a parameter budget.")
@click.argument("adapter")
@rank_option("Best rank-R approximation of every module (Eckart-Young).")
@click.option(
    "--fro", type=Number(FRACTION), default=None, help="Per module the smallest rank keeping this Frobenius fraction."
)
@click.option("--ratio", type=Number(AT_LEAST_ONE), default=None, help="Keep singular values >= sigma_max / RATIO.")
@click.option(
    "--cumulative", type=Number(FRACTION), default=None, help="Smallest rank whose sigma sum reaches this fraction."
)
@click.option(
    "--budget",
    type=Number(NON_NEGATIVE_INT),
    default=None,
    help="At most N factor parameters in all, most energy kept.",
)
@click.option("--max-rank", type=Number(POSITIVE_INT), default=None, help="Cap on every module's new rank.")
@click.option(
    "--conv-rank", type=Number(POSITIVE_INT), default=None, help="Rank for conv modules (overrides the rule for them)."
)
@click.option("--to", "to", default=None, help="Output format (default: the input's).")
@resolve_base_option
@kohya_prefix_option
@output_option
@overwrite_option
@trust_tensors_option
@click.option("--report", is_flag=True, help="Print old/new rank and retained Frobenius fraction per module.")
@json_option
@click.pass_context
def resize(
    ctx: click.Context,
    adapter: str,
    rank,
    fro,
    ratio,
    cumulative,
    budget,
    max_rank,
    conv_rank,
    to,  # noqa: ANN001
    output: str,
    overwrite: bool,
    report: bool,
    json_mode: bool,
    trust_tensors: bool,
    base: str | None,
    kohya_prefix: str | None,
) -> None:
    """Resize ADAPTER's ranks; the spectrum comes from QR of the factors, never from a dense ΔW.

    The scale convention (alpha/r, or alpha/sqrt(r) for rsLoRA) is kept with per-module
    rank_pattern/alpha_pattern; DoRA magnitudes are carried unchanged.

    \b
    Examples:
      loratools resize adapter/ --rank 4 -o small/
      loratools resize adapter/ --fro 0.95 --max-rank 16 -o small/ --report
      loratools resize adapter/ --budget 2000000 -o small/ --json
      loratools resize llama-lora/ --rank 4 --to kohya --kohya-prefix lora_te_ -o small.safetensors
    """
    from loratools.ops.resize import resize as run

    out = get_output(ctx, json_mode)
    result = run(
        adapter,
        rank=rank,
        fro=fro,
        ratio=ratio,
        cumulative=cumulative,
        budget=budget,
        max_rank=max_rank,
        conv_rank=conv_rank,
        output=output,
        to=to,
        overwrite=overwrite,
        trust_tensors=trust_tensors,
        base=base,
        kohya_prefix=kohya_prefix,
    )
    data = result.to_dict()

    def human(d: dict) -> None:
        if report:
            out.table(
                ["module", "old rank", "new rank", "retained fro"],
                [(m["name"], m["old_rank"], m["new_rank"], f"{m['retained_fro']:.4f}") for m in d["modules"]],
            )
        if d["dropped"]:
            out.line(f"dropped (rank 0): {', '.join(d['dropped'])}")
        out.line(
            f"wrote {d['output']}: {d['parameters_before']:,} -> {d['parameters_after']:,} factor parameters, "
            f"retained Frobenius fraction {d['retained_fro']:.4f}"
        )

    out.result(data, human)
