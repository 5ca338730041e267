"""Input and output plumbing shared by the low-rank algebra verbs (resize, rescale, combine, extract)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter

#: bytes added to the tensor payload when estimating an output's size (config, header, metadata)
_OVERHEAD = 1 << 20


def load(
    adapter: Adapter | str | Path, base: Any = None, *, trust_tensors: bool | None = None
) -> tuple[Adapter, Path | None]:
    """An Adapter and its path (None when an Adapter object was passed).

    ``trust_tensors`` False (the writing verbs' default) refuses an adapter whose update is ambiguous
    (see :mod:`loratools.model.ambiguity`); None (read-only verbs) does not check.
    """
    from loratools.formats.adapter_io import load_adapter
    from loratools.model.adapter import Adapter
    from loratools.model.ambiguity import require_unambiguous
    from loratools.publishing.hub import resolve_path

    if isinstance(base, str | Path) and not isinstance(adapter, Adapter):
        from loratools.formats.adapter_io import is_llamacpp_gguf
        from loratools.formats.gguf.names import is_gguf_file

        if is_llamacpp_gguf(base) and not is_gguf_file(adapter):
            base = None  # a GGUF model names no Hugging Face modules: here it is only the target of a gguf write
    if isinstance(adapter, Adapter):
        loaded, path = adapter, None
    else:
        loaded, path = load_adapter(adapter, base=base), resolve_path(adapter, "adapter")
    if trust_tensors is not None:
        require_unambiguous(loaded, trust_tensors=trust_tensors)
    return loaded, path


def payload_bytes(adapter: Adapter) -> int:
    """The size of the adapter's tensors on disk (plus a margin for headers and config)."""
    n = _OVERHEAD
    for m in adapter.modules.values():
        for t in (m.down, m.up, m.magnitude, m.bias):
            if t is not None:
                n += t.numel() * t.element_size()
    for t in adapter.replacements.values():
        n += t.numel() * t.element_size()
    return n


def fresh_meta(adapter: Adapter) -> dict[str, Any]:
    """A copy of ``adapter.meta`` without what described the input file rather than the content."""
    meta = dict(adapter.meta)
    for stale in ("declared_ranks", "files", "provenance", "source"):
        meta.pop(stale, None)
    return meta


def writer_options(fmt: type, options: dict[str, Any]) -> dict[str, Any]:
    """The set ``options`` if ``fmt``'s writer takes them all; a UsageError naming the CLI options otherwise.

    An option the target format does not take is refused, never ignored (``--kohya-prefix`` for a PEFT
    output, ``--model`` for a kohya file).
    """
    import inspect

    from loratools.errors import UsageError

    accepted = set(inspect.signature(fmt.write).parameters) - {"cls", "adapter", "path", "options", "provenance"}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - accepted)
    if unknown:
        flags = sorted(cli_flag(k) for k in accepted)
        raise UsageError(
            f"the {fmt.name} format takes no {', '.join(cli_flag(k) for k in unknown)} option",
            hint=f"{fmt.name} takes {', '.join(flags)}" if flags else f"drop it: {fmt.name} takes no such options",
        )
    return given


def cli_flag(name: str) -> str:
    """A Python keyword (``kohya_prefix``) as the command-line option that sets it (``--kohya-prefix``)."""
    return "--" + name.replace("_", "-")


def gguf_base(base: Any) -> Any:
    """What the gguf writer gets as its base: a Hugging Face folder opened (names, tensors to compare full
    tensors with), a folder holding only config.json as its path, anything else as given."""
    if isinstance(base, str | Path) and Path(base).is_dir():
        from loratools.checkpoint.reader import open_checkpoint
        from loratools.errors import LoratoolsError

        try:
            return open_checkpoint(base)
        except LoratoolsError:
            return base
    return base


def write(
    adapter: Adapter,
    output: str | Path,
    *,
    operation: str,
    parameters: dict[str, Any],
    inputs: dict[str, str | Path | None],
    to: str | None = None,
    overwrite: bool = False,
    kohya_prefix: str | None = None,
    base: Any = None,
) -> Path:
    """Save ``adapter`` atomically in ``to`` (default: its own format) with a provenance record.

    ``kohya_prefix`` names modules that are under no pipeline component in a kohya output (``lora_te_``);
    ``base`` (a .gguf model file or a Hugging Face folder) is the model a gguf output is written for.
    """
    from loratools.formats.adapter_io import save_adapter
    from loratools.formats.registry import get_format
    from loratools.publishing.publish import check_disk_space, describe_input, provenance

    fmt = get_format(to or adapter.format or "peft")
    if fmt.name == "onnx-adapter":  # written for one graph's LoRA inputs, which only convert is told (--for)
        from loratools.errors import UsageError

        raise UsageError(
            f"{operation} cannot write an .onnx_adapter file: it is made for one ONNX graph, named with "
            "convert --for",
            hint="write peft here, then: loratools convert OUT --to onnx-adapter --for MODEL -o OUT",
        )
    options = writer_options(fmt, {"kohya_prefix": kohya_prefix})
    if fmt.name == "gguf":
        options["base"] = gguf_base(base)
    if kohya_prefix is not None:
        parameters = {**parameters, "kohya_prefix": kohya_prefix}
    adapter = replace(adapter, meta=fresh_meta(adapter))
    check_disk_space(output, payload_bytes(adapter))
    record = provenance(
        operation,
        parameters,
        {name: describe_input(path) for name, path in inputs.items() if path is not None},
    )
    paths = tuple(p for p in inputs.values() if p is not None)
    return save_adapter(
        adapter, output, format=fmt.name, overwrite=overwrite, inputs=paths, provenance=record, **options
    )
