"""Options shared by several commands: one definition each, so they read the same everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from loratools.args.numeric_args import POSITIVE_INT, WEIGHT, Range, check_weights
from loratools.errors import UsageError

json_option = click.option("--json", "json_mode", is_flag=True, help="Print one JSON object (see docs/json.md).")


def _nonempty_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise click.BadParameter("an empty path; give a file or folder name (for example -o out/NAME)")
    return value


output_option = click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=str),
    callback=_nonempty_path,
    help="Where to write the result.",
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


class Number(click.ParamType):
    """A number option: finite and in ``allowed`` (numeric_args.Range), a usage error otherwise.

    Every numeric option of every command uses this type, so ``nan``, ``inf``, ``1e39`` and values out
    of range are refused the same way, by the same check the library functions make.
    """

    def __init__(self, allowed: Range) -> None:
        self.allowed = allowed
        self.name = "integer" if allowed.integer else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:  # noqa: D102
        if isinstance(value, str):
            try:
                value = int(value) if self.allowed.integer else float(value)
            except ValueError:
                self.fail(f"{value!r} is not {self.allowed.describe()}", param, ctx)
        problem = self.allowed.problem(value)
        if problem is not None:
            self.fail(problem, param, ctx)
        return value


class WeightList(click.ParamType):
    """``1,0.5,-1`` -> a tuple of finite float32 weights (each checked like every other number)."""

    name = "weights"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:  # noqa: D102
        if isinstance(value, tuple):
            return value
        weights = []
        for part in str(value).split(","):
            try:
                weights.append(float(part))
            except ValueError:
                self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)
            problem = WEIGHT.problem(weights[-1])
            if problem is not None:
                self.fail(f"each weight {problem}", param, ctx)
        return tuple(weights)


def weights_option(help: str = "Comma-separated weight per adapter (default 1 each).") -> Any:  # noqa: A002
    """``--weights``: one finite weight per adapter."""
    return click.option("--weights", type=WeightList(), default=None, help=help)


def rank_option(help: str) -> Any:  # noqa: A002
    """``--rank``: a positive integer."""
    return click.option("--rank", type=Number(POSITIVE_INT), default=None, help=help)


def parse_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``--weights`` (already parsed and checked by WeightList) -> one float per input (default 1 each)."""
    try:
        return check_weights(weights, count)
    except UsageError as exc:  # the count does not match the inputs
        raise click.BadParameter(str(exc), param_hint="--weights") from None


allow_alora_option = click.option(
    "--allow-alora",
    is_flag=True,
    help="Merge an activated LoRA (aLoRA) anyway: the result applies it to every token, not only from its "
    "invocation tokens on.",
)

allow_other_base_option = click.option(
    "--allow-other-base",
    is_flag=True,
    help="Go on although an adapter says it was trained on another model than the base (model type, "
    "architecture or sizes differ; see docs/merge.md#wrong-base).",
)

trust_tensors_option = click.option(
    "--trust-tensors",
    is_flag=True,
    help="Use the tensors' rank where adapter_config.json declares another (scale = alpha / tensor rank); "
    "without it such an adapter is refused, since its scale is ambiguous.",
)

kohya_prefix_option = click.option(
    "--kohya-prefix",
    default=None,
    help="kohya name prefix for modules outside a pipeline component (for example lora_te_; --to kohya only).",
)
resolve_base_option = click.option(
    "--base",
    type=str,
    default=None,
    help="The model the adapter is for (folder, diffusers pipeline or .gguf): resolves kohya names when --to "
    "leaves kohya; a --to gguf file is written for it.",
)
