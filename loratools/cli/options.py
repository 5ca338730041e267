"""Options shared by several commands: one definition each, so they read the same everywhere."""

from __future__ import annotations

import click

json_option = click.option("--json", "json_mode", is_flag=True, help="Print one JSON object (see docs/json.md).")
output_option = click.option(
    "-o", "--output", required=True, type=click.Path(path_type=str), help="Where to write the result."
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output.")
base_option = click.option(
    "--base", type=str, default=None, help="Base checkpoint (folder, .safetensors file or diffusers pipeline)."
)
include_option = click.option("--include", default=None, help="Only modules whose name matches this regex.")
exclude_option = click.option("--exclude", default=None, help="Skip modules whose name matches this regex.")
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    default="auto",
    show_default=True,
    help="Output dtype; auto keeps the input's.",
)
device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to compute."
)


def filters(f):  # noqa: ANN001, ANN201
    """--include and --exclude together."""
    return include_option(exclude_option(f))


def parse_weights(text: str | None, count: int) -> list[float]:
    """``--weights 1,0.5,-1`` -> floats, one per input (default 1 each)."""
    if not text:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--weights") from None
    if len(weights) != count:
        raise click.BadParameter(f"got {len(weights)} weights for {count} adapters", param_hint="--weights")
    return weights
