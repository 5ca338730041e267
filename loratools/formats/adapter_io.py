"""Loading and saving adapters through the format registry (local paths or Hub references)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.formats.peft.pipeline import split_components
from loratools.formats.registry import detect_format, get_format
from loratools.model.finite import check_tensors
from loratools.publishing.hub import resolve_path
from loratools.publishing.publish import atomic_output, check_output_layout

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter


def load_adapter(
    path: str | Path,
    *,
    format: str | None = None,
    base: str | Path | CheckpointReader | None = None,
) -> Adapter:
    """Read an adapter in any registered format into the canonical :class:`Adapter`.

    With ``base`` (a path or an open :class:`CheckpointReader`), module names are resolved against the
    base's real tensor names (kohya names need this) and normalized to them. A GGUF model as ``base``
    serves GGUF adapters only (their names and Q/K rows need its architecture and head counts).
    """
    from loratools.checkpoint.reader import CheckpointReader, open_checkpoint

    local = resolve_path(path, "adapter")
    fmt = get_format(format) if format else detect_format(local)
    reader = None
    gguf_base = None
    if base is not None:
        if gguf_base_kind(base) == "llama.cpp":
            gguf_base = base  # a GGUF model names no Hugging Face tensors; a GGUF adapter reads its heads from it
        else:
            reader = base if isinstance(base, CheckpointReader) else open_checkpoint(base)
    adapter = fmt.read(local, base=gguf_base if gguf_base is not None and fmt.name == "gguf" else reader)
    adapter.meta.setdefault("source", str(path))
    check_tensors(adapter, weights_label(adapter, local))
    if reader is not None:
        from loratools.checkpoint.keymap import normalize_adapter

        adapter = normalize_adapter(adapter, reader)
    return adapter


def gguf_base_kind(base: Any) -> str | None:
    """How a GGUF file named as a base is read: ``"diffusion"`` (a ComfyUI-GGUF architecture, or none stated and
    tensor names that are a diffusion transformer's original ones, as stable-diffusion.cpp files hold them): opened
    by ``open_checkpoint`` like a safetensors single file; ``"llama.cpp"`` (any other): a GgufBase for GGUF
    adapters, its header and architecture checked there; None for anything but a local GGUF file."""
    from loratools.formats.gguf.names import is_gguf_file

    if not isinstance(base, str | Path) or not is_gguf_file(base):
        return None
    from loratools.checkpoint.gguf_diffusion import DIFFUSION_ARCHS, MAX_DIMS, peek_architecture
    from loratools.errors import LoratoolsError
    from loratools.files.gguf_file import open_gguf_file

    arch = peek_architecture(base)
    if arch is None:
        try:
            header = open_gguf_file(Path(base), MAX_DIMS)
            arch = header.string("general.architecture")
        except LoratoolsError:  # the llama.cpp reader names the damage
            return "llama.cpp"
        if arch is None:
            from loratools.formats.dit.tables import original_family

            return "diffusion" if original_family(t.name for t in header.tensors) else "llama.cpp"
    return "diffusion" if arch in DIFFUSION_ARCHS else "llama.cpp"


def is_llamacpp_gguf(base: Any) -> bool:
    """A llama.cpp GGUF model as a base (:func:`gguf_base_kind`): its tensor table and head counts are the base."""
    return gguf_base_kind(base) == "llama.cpp"


def save_adapter(
    adapter: Adapter,
    path: str | Path,
    *,
    format: str | None = None,
    overwrite: bool = False,
    inputs: tuple[str | Path, ...] = (),
    provenance: dict[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Write ``adapter`` in ``format`` (default: the format it was read from, else PEFT), atomically.

    The one output path of every writing command (convert, resize, rescale, combine, extract), so all
    share the same refusals: module names still in kohya form cannot leave the kohya format (resolve
    them with a base), and a pipeline adapter written as PEFT becomes one PEFT adapter per component
    (``OUT/unet/``, ``OUT/text_encoder/`` ...): PEFT adapts one model, so a single adapter spanning
    components would load with nothing applied.
    """
    fmt = get_format(format or adapter.format or "peft")
    check_output_layout(fmt.name, fmt.layout, path)
    _refuse_kohya_names(adapter, fmt.name)
    if fmt.name not in ("peft", "kohya"):  # the other formats hold plain LoRA pairs only
        from loratools.model.adapter import require_lora

        require_lora(adapter, f"writing {fmt.name}")
    from loratools.model.alora import refuse_format

    refuse_format(adapter, fmt.name)  # aLoRA: only formats that keep the invocation tokens
    from loratools.model.tokens import refuse_write

    refuse_write(adapter, fmt.name)  # trainable tokens: merged, not written (loratools/tokens.py)
    from loratools.model.experts import refuse_write as refuse_experts

    refuse_experts(adapter, fmt.name)  # expert slices of target_parameters LoRAs: merged, not written yet
    check_tensors(adapter, f"the output {path}")
    if provenance is None:  # every output carries a record: --overwrite replaces only what is provably ours
        from loratools.publishing.publish import provenance as record

        source = str(adapter.meta.get("source") or "<in memory>")
        provenance = record("save_adapter", {"format": fmt.name}, {"adapter": {"source": source}})
    parts = split_components(adapter) if fmt.name == "peft" else {}
    with atomic_output(path, overwrite=overwrite, inputs=inputs, directory=fmt.layout == "folder") as tmp:
        if parts:
            for component, part in parts.items():
                fmt.write(part, Path(tmp) / component, provenance=provenance, **options)
        else:
            fmt.write(adapter, tmp, provenance=provenance, **options)
    return Path(path)


#: a module key that is still a kohya name (no dots), i.e. was not resolved against a base
_KOHYA_NAME = re.compile(r"^lora_[a-z0-9]+_[A-Za-z0-9_]+$")
#: formats that keep kohya names as they are
_KOHYA_FORMATS = ("kohya", "lycoris")


def _refuse_kohya_names(adapter: Adapter, target: str) -> None:
    from loratools.errors import UsageError, name_list

    unresolved = [n for n in adapter.modules if _KOHYA_NAME.match(n)]
    if unresolved and target not in _KOHYA_FORMATS:
        raise UsageError(
            f"{len(unresolved)} module(s) still have kohya names, which {target} cannot hold: "
            + name_list(unresolved, 4),
            hint="pass --base (the model or diffusers pipeline the LoRA was trained for) to resolve them",
        )


def weights_label(adapter: Adapter, local: Path) -> str:
    """The one weights file an adapter was read from (for messages), else its folder."""
    files = [f for f in adapter.meta.get("files") or [] if not str(f).endswith(".json")]
    return str(files[0]) if len(files) == 1 else str(local)
