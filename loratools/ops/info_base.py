"""``info`` on a file that is no adapter: a base model is named as what it is (a GGUF model's architecture, tensor
count and quant types; a safetensors checkpoint's architecture, tensor count and dtypes) with the command that uses
it, and a model ``loratools merge`` wrote (safetensors or GGUF) shows its provenance record."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loratools.errors import FormatError

#: tensor names only adapters have (LoRA, LyCORIS, OFT, IA3 factors and alphas)
_ADAPTER_WORDS = re.compile(r"lora|\.alpha$|hada_|lokr_|oft_|ia3|dora_scale|\.processor\.", re.IGNORECASE)


def _types(counts: Counter[str]) -> str:
    """``Q8_0 ×7, F32 ×5``: the most common first."""
    return ", ".join(f"{t} ×{n}" for t, n in counts.most_common())


def _index(key: str) -> int:
    """``adapter3`` -> 3 (a GGUF merge's record names its inputs so), -1 for any other key."""
    return int(key[7:]) if key.startswith("adapter") and key[7:].isdigit() else -1


def merge_record(record: dict[str, Any] | None, shown: str | Path, tensors: int) -> dict[str, Any] | None:
    """What ``info`` shows of a merged model: the base, the adapters and their weights, the loratools version."""
    if not record or record.get("operation") != "merge":
        return None
    inputs, params = record.get("inputs") or {}, record.get("parameters") or {}
    listed = inputs.get("adapters") or [inputs[k] for k in sorted(inputs, key=_index) if _index(k) >= 0]
    adapters = [a.get("path") or a.get("repo_id") for a in listed if isinstance(a, dict)]  # GGUF: adapter0, ...
    base = inputs.get("base") or {}
    return {
        "path": str(shown),
        "kind": "merged checkpoint",
        "base": base.get("path") or base.get("repo_id"),
        "adapters": adapters,
        "weights": params.get("weights"),
        "tensors": tensors,
        "provenance": record,
    }


def gguf_model(local: Path, shown: str | Path) -> dict[str, Any] | None:
    """A GGUF model ``loratools merge`` wrote: its record; any other GGUF model (``general.type`` model, or none
    stated): a FormatError saying what it is and how to use it. None for a GGUF file that says it is an adapter."""
    from loratools.checkpoint.gguf_diffusion import DIFFUSION_ARCHS, MAX_DIMS
    from loratools.files.gguf_file import open_gguf_file
    from loratools.publishing.output_guard import GGUF_RECORD_KEY
    from loratools.publishing.publish import METADATA_KEY, read_provenance

    f = open_gguf_file(local, MAX_DIMS)
    if f.get_field("general.type") is not None and f.string("general.type") == "adapter":
        return None  # an adapter the GGUF reader refused: its own message stands
    text = f.string(GGUF_RECORD_KEY) if f.get_field(GGUF_RECORD_KEY) is not None else None
    merged = merge_record(read_provenance({METADATA_KEY: text} if text else None), shown, len(f.tensors))
    if merged is not None:
        merged["architecture"] = f.string("general.architecture") if f.get_field("general.architecture") else None
        return merged
    arch = f.string("general.architecture") if f.get_field("general.architecture") else None
    types = _types(Counter(t.type_label for t in f.tensors))
    what = "a GGUF model (a ComfyUI-GGUF diffusion model)" if arch in DIFFUSION_ARCHS else "a GGUF model (a base model)"
    hint = f"merge an adapter into it: loratools merge {shown} ADAPTER -o merged.gguf"
    if arch not in DIFFUSION_ARCHS:
        hint += f"; write a GGUF adapter for it: loratools convert ADAPTER --to gguf --base {shown} -o adapter.gguf"
    raise FormatError(
        f"{shown} is {what}, not a LoRA adapter: architecture {arch or 'not stated'}, {len(f.tensors)} tensors "
        f"({types or 'none'})",
        hint=hint,
        path=local,
    )


def _architecture(reader: Any) -> str:
    """What a base checkpoint is, from its config (a pipeline's transformer or unet class), else its names."""
    from loratools.formats.dit.flux_io import base_family

    label = base_family(reader)  # "a llama model", "a FluxTransformer2DModel pipeline", "a Flux checkpoint"
    return "a checkpoint (its architecture is not stated)" if label.endswith("of another architecture") else label


@contextlib.contextmanager
def _checkpoint(local: Path) -> Iterator[Any]:
    """``local`` opened as a base checkpoint, or None where it opens as none; closed after."""
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.errors import LoratoolsError

    reader = None
    with contextlib.suppress(LoratoolsError):
        reader = open_checkpoint(local)
    try:
        yield reader
    finally:
        if reader is not None:
            reader.close()


def base_checkpoint(local: Path, shown: str | Path) -> FormatError | None:
    """The error ``info`` raises for a base checkpoint (a safetensors file, a model folder, a diffusers pipeline):
    what it is and the commands that take it; None when ``local`` opens as no checkpoint."""
    from loratools.errors import LoratoolsError

    with _checkpoint(local) as reader:
        if reader is None:
            return None
        try:
            keys = reader.keys()
            if not keys or any(_ADAPTER_WORDS.search(k) for k in keys):
                return None  # an adapter in a layout no reader takes (XLabs, a damaged file) is not called a base
            dtypes = _types(Counter(str(reader.info(k).dtype).removeprefix("torch.") for k in keys))
            quant = f", quantized ({reader.quant.summary().get('scheme')})" if getattr(reader, "quant", None) else ""
            return FormatError(
                f"{shown} looks like a base model, not an adapter: {_architecture(reader)}, {len(keys)} tensors "
                f"({dtypes}){quant}",
                hint=f"merge an adapter into it: loratools merge {shown} ADAPTER -o OUT; check an adapter against it: "
                f"loratools info ADAPTER --base {shown}",
                path=local,
            )
        except LoratoolsError:
            return None


def merged_checkpoint(local: Path, shown: str | Path) -> dict[str, Any] | None:
    """What ``info`` says of a safetensors checkpoint that ``loratools merge`` wrote: its provenance record (the
    base, the adapters and their weights); None when ``local`` is no checkpoint or holds no merge record."""
    from loratools.publishing.publish import read_provenance

    with _checkpoint(local) as reader:
        keys = reader.keys() if reader is not None else []
        if not keys or not hasattr(reader, "metadata"):
            return None
        return merge_record(read_provenance(reader.metadata(reader.file_of(keys[0]))), shown, len(keys))


def not_an_adapter(local: Path, shown: str | Path, error: FormatError) -> dict[str, Any]:
    """``info`` of what no adapter format reads: a merge output's record, else ``error`` told what the file is (a
    GGUF or safetensors base model, with the command that uses it); ``error`` itself for anything else."""
    from loratools.files.gguf_file import is_gguf_file

    if local.is_file() and is_gguf_file(local):
        merged = gguf_model(local, shown)  # raises for a GGUF base model
        if merged is not None:
            return merged
        raise error
    merged = merged_checkpoint(local, shown)
    if merged is not None:
        return merged
    described = base_checkpoint(local, shown)
    raise (described or error) from None
