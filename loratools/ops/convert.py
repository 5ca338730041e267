"""``convert``: rewrite an adapter in another registered format without changing any ΔW.

Factors are copied bit for bit; alpha is carried per module (or folded exactly: rsLoRA's alpha/√r becomes
kohya's alpha·√r / r). What the target cannot hold is refused with the list of modules, never dropped.
The function is generic over the registry: a format's own write options (``dtype``, ``model`` for the
ONNX adapter format) pass through ``**format_options``, and options a format does not take are refused.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import UsageError
from loratools.ops._algebra_io import gguf_base as _gguf_base
from loratools.ops._algebra_io import writer_options

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter


@dataclass
class ConvertResult:
    """What ``convert`` wrote: where, in which format, from which, and which alphas it folded."""

    output: str
    format: str
    source_format: str | None
    modules: int
    replacements: int
    folded_alpha: list[str] = field(default_factory=list)
    #: the Ollama Modelfile written beside a GGUF adapter (``ollama=True``), else None
    modelfile: str | None = None
    #: onnx-adapter: modules left out because the slot graph's export dropped their weight, and why
    skipped: dict[str, str] = field(default_factory=dict)
    #: ``as_lora``: what each module became (rank kept, exact rank, relative error; see ops/lower.py)
    lowered: dict[str, Any] | None = None
    #: ``for_base``/``remap_prefix``: the prefix rewrites applied and how many modules now bind (ops/bind.py)
    rebound: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(
    adapter: str | Path | Adapter,
    to: str | None,
    output: str | Path,
    *,
    base: str | Path | CheckpointReader | None = None,
    kohya_prefix: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    overwrite: bool = False,
    ollama: bool = False,
    trust_tensors: bool = False,
    as_lora: bool = False,
    rank: int | None = None,
    fro: float | None = None,
    for_base: str | Path | CheckpointReader | None = None,
    remap_prefix: tuple[str, ...] | list[str] = (),
    allow_other_base: bool = False,
    **format_options: Any,
) -> ConvertResult:
    """Write ``adapter`` (a path or an :class:`Adapter`) to ``output`` in format ``to``, losslessly.

    ``base`` resolves kohya names to real module paths (needed to leave kohya). ``kohya_prefix`` names
    modules that are not under a pipeline component when writing kohya (``lora_te_`` for a bare text
    encoder, say). ``include``/``exclude`` (regexes over module names, applied after resolution) pick
    modules, e.g. one component of a pipeline LoRA for a single-model base. ``format_options`` go to the
    target format's writer (``dtype=``, ``model=`` for ``onnx-adapter`` (required), ``outtype=`` for ``gguf``). For
    ``gguf``, ``base`` (a .gguf model file or a Hugging Face folder) is also the model the file is written
    for, and ``ollama`` writes an Ollama ``Modelfile`` beside it. ``as_lora`` lowers every module (LoHa,
    LoKr, OFT, BOFT, IA3, DoRA, modules_to_save) to plain LoRA, exactly unless ``rank``/``fro`` ask for an
    optimal truncation (:func:`loratools.ops.lower.lower_to_lora`; W-dependent ones need ``base``).
    ``allow_other_base`` converts for ``base`` an adapter that says it was trained on another model (merge's
    option of that name). ``remap_prefix`` (``OLD=NEW`` rules) and ``for_base`` (the model it must bind to: the
    prefix rewrites that
    make every module path bind to its module tree, as PEFT and vLLM look them up, a vision-language
    wrapper's ``model.language_model.…`` say) rename modules; ``to`` None keeps the adapter's own format
    (:func:`loratools.ops.bind.bind_to`).
    Raises :class:`UsageError` or
    :class:`UnsupportedError` listing the modules the target cannot hold.
    """
    from loratools.formats.adapter_io import load_adapter, save_adapter
    from loratools.formats.registry import get_format
    from loratools.model.adapter import Adapter
    from loratools.publishing.publish import check_disk_space, describe_input, provenance

    if to is None:
        if for_base is None and not remap_prefix:
            raise UsageError("convert needs --to FORMAT", hint="loratools convert ADAPTER --to peft -o OUT")
        to = _own_format(adapter)
    fmt = get_format(to)
    if fmt.name == "onnx-adapter" and format_options.get("model") is None:
        raise UsageError(  # without the graph, modules its export left out (BERT's pooler) fail at run time
            "an .onnx_adapter file feeds the LoRA inputs of one ONNX graph: name it with --for MODEL (the model "
            "exported with --lora-slots, or an onnxruntime-genai model), so the tensors match its inputs and "
            "modules the export left out are left out too",
            hint="loratools convert ADAPTER --to onnx-adapter --for MODEL -o OUT",
        )
    if ollama and fmt.name != "gguf":
        raise UsageError("--ollama writes a Modelfile for a GGUF adapter", hint="use it with --to gguf")
    target_base = base  # a GGUF model serves load_adapter (GGUF adapters) and the gguf writer only
    if isinstance(base, str | Path):
        from loratools.formats.adapter_io import is_llamacpp_gguf

        if is_llamacpp_gguf(base):  # a GGUF diffusion model is a base like a single file
            base = None
    inputs: tuple[str | Path, ...] = ()
    if isinstance(adapter, Adapter):
        source = adapter
        if base is not None:
            from loratools.checkpoint.keymap import normalize_adapter
            from loratools.checkpoint.reader import CheckpointReader, open_checkpoint

            reader = base if isinstance(base, CheckpointReader) else open_checkpoint(base)
            source = normalize_adapter(adapter, reader)
    else:
        inputs = (adapter,)
        source = load_adapter(adapter, base=target_base)
    from loratools.model.ambiguity import require_unambiguous

    require_unambiguous(source, trust_tensors=trust_tensors)
    if include or exclude:
        source = source.select(include, exclude)
    if isinstance(base, str | Path):  # is the base the adapter's? merge's rule, named families (ops/convert_base.py)
        from loratools.checkpoint.reader import open_checkpoint
        from loratools.ops.convert_base import require_base_family, require_pipeline

        family_reader = open_checkpoint(base)
        try:
            shown = str(adapter) if inputs else "the adapter"
            require_base_family(source, family_reader, shown, str(base), allow_other_base=allow_other_base)
            require_pipeline(fmt.name, source, family_reader, str(base))
        finally:
            family_reader.close()
    rebound = None
    if for_base is not None or remap_prefix:
        from loratools.ops.bind import bind_to

        source, rebound = bind_to(source, for_base, tuple(remap_prefix))
    lowered = None
    if not as_lora and fmt.name not in ("peft", "kohya"):
        from loratools.model.adapter import require_lora

        require_lora(source, f"--to {fmt.name}")
    if (rank is not None or fro is not None) and not as_lora:
        raise UsageError("--rank/--fro truncate while lowering to LoRA", hint="add --as-lora")
    if as_lora:
        from loratools.checkpoint.reader import CheckpointReader, open_checkpoint
        from loratools.ops.lower import lower_to_lora

        low_reader = base if isinstance(base, CheckpointReader) else (open_checkpoint(base) if base else None)
        source, low = lower_to_lora(source, low_reader, rank=rank, fro=fro)
        lowered = low.to_dict()
    skipped: dict[str, str] = {}
    if fmt.name == "onnx-adapter" and format_options.get("model") is not None:
        from loratools.onnx.slot_map import dropped_modules

        skipped = dropped_modules(source, format_options["model"])  # no slot, and no effect on the outputs
        if skipped:
            source = source.select(exclude="^(" + "|".join(re.escape(n) for n in skipped) + ")$")
    options = dict(format_options)
    if kohya_prefix is not None:
        options["kohya_prefix"] = kohya_prefix
    options = writer_options(fmt, options)
    if fmt.name == "gguf":
        options["base"] = _gguf_base(target_base)

    from loratools.model.adapter import module_tensors

    nbytes = sum(m.parameters * next(iter(module_tensors(m).values())).element_size()
                 for m in source.modules.values())
    nbytes += sum(t.numel() * t.element_size() for t in source.replacements.values())
    check_disk_space(output, nbytes)
    record = provenance(
        "convert",
        {
            "to": fmt.name,
            "base": str(target_base) if isinstance(target_base, str | Path) else None,
            "kohya_prefix": kohya_prefix,
            **({"as_lora": True, "rank": rank, "fro": fro} if as_lora else {}),
            **({"for_base": str(for_base), "remap_prefix": list(remap_prefix)} if rebound is not None else {}),
            **{k: str(v) for k, v in format_options.items() if v is not None},
        },
        {"adapter": describe_input(adapter)} if inputs else {},
    )
    save_adapter(source, output, format=fmt.name, overwrite=overwrite, inputs=inputs, provenance=record, **options)
    folded = [n for n, m in source.modules.items() if m.use_rslora] if fmt.name == "kohya" else []
    modelfile = _write_modelfile(output, target_base, overwrite, record) if ollama else None
    return ConvertResult(
        output=str(output),
        format=fmt.name,
        source_format=source.format,
        modules=len(source.modules),
        replacements=len(source.replacements),
        folded_alpha=folded,
        modelfile=modelfile,
        skipped=skipped,
        lowered=lowered,
        rebound=rebound,
    )


def _own_format(adapter: Any) -> str:
    """The format an adapter is in (a rename keeps it)."""
    from loratools.model.adapter import Adapter

    if isinstance(adapter, Adapter):
        return adapter.format or "peft"
    from loratools.formats.registry import detect_format
    from loratools.publishing.hub import resolve_path

    return detect_format(resolve_path(adapter, "adapter")).name


def _write_modelfile(adapter: str | Path, base: Any, overwrite: bool, record: dict[str, Any]) -> str:
    """An Ollama ``Modelfile`` beside ``adapter``: ``FROM`` the base, ``ADAPTER ./<adapter file>``, and our
    provenance record as a ``#`` comment (so --overwrite may replace it, and no Modelfile of the user's).

    Ollama resolves relative paths against the Modelfile's folder, so the base is written relative to it.
    """
    import json
    import os

    from loratools.publishing.output_guard import TEXT_RECORD_PREFIX
    from loratools.publishing.publish import atomic_output

    path = Path(adapter).parent / "Modelfile"
    origin = os.path.relpath(Path(str(base)).resolve(), path.parent.resolve())
    origin = origin if origin.startswith(".") else f"./{origin}"
    mark = TEXT_RECORD_PREFIX + json.dumps(record, sort_keys=True, separators=(",", ":"))
    text = f"FROM {origin}\nADAPTER ./{Path(adapter).name}\n{mark}\n"
    with atomic_output(path, overwrite=overwrite, directory=False) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return str(path)
