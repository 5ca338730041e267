"""``loratools diff``: compare two adapters module by module (norms, relative difference, cosine)."""

from __future__ import annotations

import click

from loratools.cli.options import base_option, json_option, trust_tensors_option
from loratools.cli.output import get_output


@click.command(short_help="Compare two adapters: ranks, norms, relative difference and cosine per module.")
@click.argument("a")
@click.argument("b")
@base_option
@trust_tensors_option
@json_option
@click.pass_context
def diff(ctx: click.Context, a: str, b: str, base: str | None, trust_tensors: bool, json_mode: bool) -> None:
    """Compare adapters A and B: configuration differences, modules only in one, and per common module
    ‖ΔA‖, ‖ΔB‖, ‖ΔA−ΔB‖/‖ΔA‖ and cos(ΔA, ΔB), computed from r×r products of the factors.

    --base resolves module names when A and B are in different formats.

    \b
    Examples:
      loratools diff run1/ run2/
      loratools diff peft_adapter/ kohya.safetensors --base model/ --json
    """
    from loratools.ops.diff import diff as run

    out = get_output(ctx, json_mode)
    data = run(a, b, base=base, trust_tensors=trust_tensors)

    def human(d: dict) -> None:
        for key, v in d["config"].items():
            out.line(f"config {key}: {v['a']!r} vs {v['b']!r}")
        for side in ("a", "b"):
            if d[f"only_in_{side}"]:
                out.line(f"only in {side.upper()} ({len(d[f'only_in_{side}'])}): {', '.join(d[f'only_in_{side}'])}")
        out.table(
            ["module", "rank A", "rank B", "|ΔA|", "|ΔB|", "rel diff", "cosine"],
            [
                (
                    m["name"],
                    m["rank_a"],
                    m["rank_b"],
                    m["norm_a"],
                    m["norm_b"],
                    m["relative_difference"],
                    m["cosine"] if "error" not in m else m["error"],
                )
                for m in d["modules"]
            ],
        )

    out.result(data, human)
