"""``convert``: rewrite an adapter in another registered format without changing any ΔW.

Factors are copied bit for bit; alpha is carried per module (or folded exactly: rsLoRA's alpha/√r becomes
kohya's alpha·√r / r). What the target cannot hold is refused with the list of modules, never dropped.
The function is generic over the registry: a format's own write options (``dtype``, ``model`` for the
ONNX adapter format) pass through ``**format_options``, and options a format does not take are refused.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, name_list

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..checkpoint.reader import CheckpointReader

#: a module key that is still a kohya name (no dots), i.e. was not resolved against a base
_KOHYA_NAME = re.compile(r"^lora_[a-z0-9]+_[A-Za-z0-9_]+$")


@dataclass
class ConvertResult:
    """What ``convert`` wrote: where, in which format, from which, and which alphas it folded."""

    output: str
    format: str
    source_format: str | None
    modules: int
    replacements: int
    folded_alpha: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _write_options(fmt: type, options: dict[str, Any]) -> dict[str, Any]:
    """Options the format's writer names explicitly; UsageError for any other (set) option."""
    accepted = set(inspect.signature(fmt.write).parameters) - {"cls", "adapter", "path", "options", "provenance"}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise UsageError(
            f"the {fmt.name} format takes no {', '.join(unknown)} option",
            hint=f"{fmt.name} accepts: {', '.join(sorted(accepted)) or 'no options'}",
        )
    return given


def convert(
    adapter: str | Path | Adapter,
    to: str,
    output: str | Path,
    *,
    base: str | Path | CheckpointReader | None = None,
    kohya_prefix: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    overwrite: bool = False,
    **format_options: Any,
) -> ConvertResult:
    """Write ``adapter`` (a path or an :class:`Adapter`) to ``output`` in format ``to``, losslessly.

    ``base`` resolves kohya names to real module paths (needed to leave kohya). ``kohya_prefix`` names
    modules that are not under a pipeline component when writing kohya (``lora_te_`` for a bare text
    encoder, say). ``include``/``exclude`` (regexes over module names, applied after resolution) pick
    modules, e.g. one component of a pipeline LoRA for a single-model base. ``format_options`` go to the
    target format's writer (``dtype=``, ``model=`` for ``onnx-adapter``). Raises :class:`UsageError` or
    :class:`UnsupportedError` listing the modules the target cannot hold.
    """
    from ..adapter import Adapter
    from ..adapter_io import load_adapter, save_adapter
    from ..formats.registry import get_format
    from ..publish import check_disk_space, describe_input, provenance

    fmt = get_format(to)
    inputs: tuple[str | Path, ...] = ()
    if isinstance(adapter, Adapter):
        source = adapter
        if base is not None:
            from ..checkpoint.keymap import normalize_adapter
            from ..checkpoint.reader import CheckpointReader, open_checkpoint

            reader = base if isinstance(base, CheckpointReader) else open_checkpoint(base)
            source = normalize_adapter(adapter, reader)
    else:
        inputs = (adapter,)
        source = load_adapter(adapter, base=base)
    if include or exclude:
        source = source.select(include, exclude)
    options = dict(format_options)
    if kohya_prefix is not None:
        options["kohya_prefix"] = kohya_prefix
    options = _write_options(fmt, options)

    unresolved = [n for n in source.modules if _KOHYA_NAME.match(n)]
    if unresolved and fmt.name != "kohya":
        raise UsageError(
            f"{len(unresolved)} module(s) still have kohya names, which {fmt.name} cannot hold: "
            + name_list(unresolved, 4),
            hint="pass --base (the model or diffusers pipeline the LoRA was trained for) to resolve them",
        )
    nbytes = sum(m.parameters * m.down.element_size() for m in source.modules.values())
    nbytes += sum(t.numel() * t.element_size() for t in source.replacements.values())
    check_disk_space(output, nbytes)
    record = provenance(
        "convert",
        {
            "to": fmt.name,
            "base": str(base) if isinstance(base, str | Path) else None,
            "kohya_prefix": kohya_prefix,
            **{k: str(v) for k, v in format_options.items() if v is not None},
        },
        {"adapter": describe_input(adapter)} if inputs else {},
    )
    save_adapter(source, output, format=fmt.name, overwrite=overwrite, inputs=inputs, provenance=record, **options)
    folded = [n for n, m in source.modules.items() if m.use_rslora] if fmt.name == "kohya" else []
    return ConvertResult(
        output=str(output),
        format=fmt.name,
        source_format=source.format,
        modules=len(source.modules),
        replacements=len(source.replacements),
        folded_alpha=folded,
    )
