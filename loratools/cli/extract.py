"""``loratools extract``: a LoRA from a fine-tuned checkpoint and its base, streamed tensor by tensor."""

from __future__ import annotations

import click

from loratools.args.numeric_args import FRACTION, NON_NEGATIVE, POSITIVE_INT
from loratools.cli.options import (
    Number,
    dtype_option,
    filters,
    json_option,
    kohya_prefix_option,
    output_option,
    overwrite_option,
    rank_option,
)
from loratools.cli.output import get_output


@click.command(short_help="Extract a LoRA from a fine-tuned checkpoint minus its base.")
@click.argument("base")
@click.argument("tuned")
@rank_option("Rank of every extracted module.")
@click.option(
    "--fro", type=Number(FRACTION), default=None, help="Per module the smallest rank keeping this Frobenius fraction."
)
@click.option("--max-rank", type=Number(POSITIVE_INT), default=None, help="Cap on every module's rank.")
@click.option("--exact", is_flag=True, help="Always use the full SVD (slower on large matrices).")
@click.option(
    "--threshold",
    type=Number(POSITIVE_INT),
    default=1024,
    show_default=True,
    help="Matrices with min(out, in) above this use a randomized SVD.",
)
@click.option(
    "--min-delta",
    type=Number(NON_NEGATIVE),
    default=1e-6,
    show_default=True,
    help="Skip tensors with |ΔW| <= this fraction of |W|.",
)
@click.option(
    "--save-module",
    "save_modules",
    multiple=True,
    metavar="REGEX",
    help="Save modules matching this regex whole (modules_to_save) instead of as LoRA; repeatable.",
)
@click.option(
    "--head-error",
    type=Number(NON_NEGATIVE),
    default=0.1,
    show_default=True,
    help="Save an output head (lm_head, score, ...) whole when its LoRA would lose more than this fraction "
    "of |ΔW| (1: never).",
)
@filters
@dtype_option
@click.option("--to", "to", default=None, help="Output format (default: peft).")
@kohya_prefix_option
@output_option
@overwrite_option
@json_option
@click.pass_context
def extract(
    ctx: click.Context,
    base: str,
    tuned: str,
    rank: int | None,
    fro: float | None,
    max_rank: int | None,
    exact: bool,
    threshold: int,
    min_delta: float,
    save_modules: tuple[str, ...],
    head_error: float,
    include: str | None,
    exclude: str | None,
    dtype: str,
    to: str | None,
    kohya_prefix: str | None,
    output: str,
    overwrite: bool,
    json_mode: bool,
) -> None:
    """Extract TUNED − BASE as a LoRA: linear and conv weights are factored by a truncated SVD, other
    changed tensors (norms, embeddings, biases) are saved whole (modules_to_save).

    \b
    Examples:
      loratools extract base/ finetuned/ --rank 16 -o lora/
      loratools extract base/ finetuned/ --fro 0.9 --max-rank 64 --include 'self_attn' -o lora/
      loratools extract base/ finetuned/ --rank 16 --save-module 'embed_tokens|lm_head' -o lora/
    """
    from loratools.ops.extract import extract as run

    out = get_output(ctx, json_mode)
    with out.progress_callback(0, "extracting") as step:
        result = run(
            base,
            tuned,
            rank=rank,
            fro=fro,
            max_rank=max_rank,
            include=include,
            exclude=exclude,
            save_modules="|".join(f"(?:{r})" for r in save_modules) or None,
            head_error=head_error,
            exact=exact,
            threshold=threshold,
            min_delta=min_delta,
            dtype=dtype,
            output=output,
            to=to,
            overwrite=overwrite,
            progress=step,
            kohya_prefix=kohya_prefix,
        )
    data = result.to_dict()

    def human(d: dict) -> None:
        out.table(
            ["module", "shape", "rank", "retained fro"],
            [(m["name"], "x".join(map(str, m["shape"])), m["rank"], f"{m['retained_fro']:.4f}") for m in d["modules"]],
        )
        if d["replaced"]:
            out.line(f"saved whole ({len(d['replaced'])}): {', '.join(d['replaced'])}")
        for w in d["saved_whole"]:
            if w["lowrank_error"] is not None:
                out.line(f"{w['name']} saved whole: a rank-{w['rank']} LoRA would be {w['lowrank_error']:.1%} off")
        out.line(
            f"wrote {d['output']}: {len(d['modules'])} LoRA modules, "
            f"{d['skipped_negligible']} unchanged tensors skipped"
        )

    out.result(data, human)
