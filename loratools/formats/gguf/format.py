"""GGUF LoRA adapters for llama.cpp, Ollama and LM Studio (the ``gguf`` package writes and reads the file).

Metadata the llama.cpp loader checks (``src/llama-adapter.cpp``, ``llama_adapter_lora_init_impl``):
``general.type = adapter``, ``general.architecture`` equal to the base's, ``adapter.type = lora``, and
``adapter.lora.alpha`` (f32). Tensors are ``<base GGUF name>.lora_a`` / ``.lora_b``. Each module's exact
scale is folded into ``lora_b`` and alpha is written as 0, which the runtime reads as scale 1 (see
:mod:`.gguf_plan`). The head counts and block count go into the file too (``<arch>.attention.head_count``,
...), which the runtime ignores, so reading it back needs no ``--base``. aLoRA invocation tokens travel
as ``adapter.alora.invocation_tokens`` (uint32 array).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, UnsupportedError, UsageError, name_list
from loratools.formats.registry import AdapterFormat, register_format

if TYPE_CHECKING:
    import numpy as np
    import torch

    from loratools.formats.gguf.names import GgufBase
    from loratools.formats.registry import KeyResolver
    from loratools.model.adapter import Adapter

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_PROVENANCE_KEY = "loratools.provenance"
_BASE_KEY = "loratools.base_model"


def _default_outtype(adapter: Adapter) -> str:
    import torch

    dtypes = adapter.dtypes()
    if dtypes == {torch.float16}:
        return "f16"
    if dtypes == {torch.bfloat16}:
        return "bf16"
    return "f32"


def encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any, str]:
    """``(array, raw_dtype, type written)`` for ``GGUFWriter.add_tensor``; Q8_0 falls back to F16 like
    llama.cpp's converter when a row is not a whole number of 32-value blocks."""
    import gguf
    import numpy as np

    x = t.detach().float().cpu().numpy().astype(np.float32, copy=False)
    if outtype == "f32":
        return x, None, "F32"
    if outtype == "f16":
        return x.astype(np.float16), None, "F16"
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    try:
        return gguf.quants.quantize(x, qtype), qtype, qtype.name
    except gguf.QuantError:
        return x.astype(np.float16), None, "F16"


def _exact_type(t: torch.Tensor, outtype: str) -> str:
    """``outtype`` when it holds ``t`` exactly, else f32: a 16-bit adapter's B with its scale folded in
    (rsLoRA, patterns) is rounded once more in 16 bits (1e-3 off in llama.cpp's logits, measured), so
    without --outtype it is written F32; A, and B whose scale is a power of two, stay 16-bit."""
    import torch

    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(outtype)
    if dtype is None or torch.equal(t.to(dtype).float(), t.float()):
        return outtype
    return "f32"


def check_plan(adapter: Adapter, base: GgufBase, merge: bool = False) -> Any:
    """The :class:`~.gguf_plan.GgufPlan` of ``adapter`` for ``base`` (``merge``: to be merged into it);
    UnsupportedError on any problem."""
    from loratools.formats.gguf.plan import plan

    p = plan(adapter, base, merge=merge)
    if p.problems:
        first = p.problems[0]
        more = f" (and {len(p.problems) - 1} more: {name_list([x.module or '' for x in p.problems[1:]], 3)})"
        raise UnsupportedError(
            f"{base.source}: {first.message}" + (more if len(p.problems) > 1 else ""),
            hint=first.hint or f"run 'loratools validate ADAPTER --target llama.cpp --base {base.source}'",
        )
    if not p.pairs:
        raise UsageError("the adapter has no modules to write as GGUF LoRA pairs")
    return p


def _base_of_file(d: dict[str, Any]) -> GgufBase:
    from loratools.formats.gguf.names import GgufBase, spec_for_gguf_arch

    spec = spec_for_gguf_arch(str(d["arch"]), "the adapter's GGUF metadata")
    return GgufBase(
        "the adapter's own GGUF metadata", spec, int(d["n_layer"]), int(d["n_head"]), int(d["n_head_kv"]), False
    )


@register_format
class GgufFormat(AdapterFormat):
    name = "gguf"
    layout = "file"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """A GGUF file whose ``general.type`` is ``adapter`` (a GGUF model is a base, not an adapter)."""
        import gguf

        from loratools.formats.gguf.names import is_gguf_file, open_gguf

        if not is_gguf_file(path):
            return False
        try:
            return open_gguf(path).string(gguf.Keys.General.TYPE) == "adapter"
        except FormatError:  # a damaged GGUF file: an adapter's read() names what is wrong with it
            with open(path, "rb") as fh:
                head = fh.read(1 << 20)
            return b"adapter.type" in head or b"\x07\x00\x00\x00\x00\x00\x00\x00adapter" in head

    @classmethod
    def write(
        cls,
        adapter: Adapter,
        path: Path,
        provenance: dict[str, Any] | None = None,
        *,
        base: str | Path | GgufBase | KeyResolver | None = None,
        outtype: str | None = None,
    ) -> None:
        import gguf

        from loratools.formats.gguf.names import load_base

        if base is None and adapter.meta.get("gguf_base"):
            base = _base_of_file(adapter.meta["gguf_base"])  # read from a GGUF adapter: written for its base
        if base is None:
            raise UsageError(
                "a GGUF adapter is written for one base model: pass --base (a .gguf model file or the "
                "Hugging Face model folder)",
                hint="loratools convert ADAPTER --to gguf --base model.gguf -o adapter.gguf",
            )
        chosen, outtype = outtype, outtype or _default_outtype(adapter)
        if outtype not in OUTTYPES:
            raise UsageError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
        info = load_base(base)
        p = check_plan(adapter, info)
        writer = gguf.GGUFWriter(path, info.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        writer.add_block_count(info.n_layer)
        writer.add_head_count(info.n_head)
        writer.add_head_count_kv(info.n_head_kv)
        tokens = ((adapter.meta.get("config") or {}).get("alora_invocation_tokens")) or adapter.meta.get(
            "alora_invocation_tokens"
        )
        if tokens:
            writer.add_key_value(
                gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS,
                [int(x) for x in tokens],
                gguf.GGUFValueType.ARRAY,
                sub_type=gguf.GGUFValueType.UINT32,
            )
        if adapter.base_model:
            writer.add_string(_BASE_KEY, str(adapter.base_model))
        if provenance:
            writer.add_string(_PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
        for pair in p.pairs:
            for suffix, t in (("lora_a", pair.lora_a), ("lora_b", pair.lora_b)):
                arr, raw, _ = encode(t, outtype if chosen or suffix == "lora_a" else _exact_type(t, outtype))
                writer.add_tensor(f"{pair.tensor}.{suffix}", arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    @classmethod
    def read(cls, path: Path, base: KeyResolver | None = None) -> Adapter:
        """The adapter, after its header is checked in full (:mod:`.checks`) before any tensor is read."""
        import gguf

        from loratools.formats.gguf.checks import block_count, check_pair, check_widths, head_counts, lora_pairs
        from loratools.formats.gguf.names import GgufBase, load_base, open_gguf, spec_for_gguf_arch
        from loratools.formats.gguf.rewrites import TOKEN_EMBD
        from loratools.model.adapter import Adapter, LoraModule

        reader = open_gguf(path)
        kind = reader.string(gguf.Keys.General.TYPE)
        if kind != "adapter":
            raise FormatError(
                f"{path}: a GGUF model (general.type {kind!r}), not a GGUF adapter",
                hint="a GGUF model is a base: pass it as --base, or merge into it with loratools merge",
                path=path,
            )
        adapter_type = reader.string(gguf.Keys.Adapter.TYPE)
        if adapter_type is None:
            raise FormatError(f"{path}: GGUF adapter without adapter.type (llama.cpp needs 'lora')", path=path)
        if adapter_type != "lora":
            raise UnsupportedError(f"{path}: adapter.type is {adapter_type!r}, not 'lora'", path=path)
        arch = reader.string(gguf.Keys.General.ARCHITECTURE)
        if arch is None:
            raise FormatError(f"{path}: GGUF adapter without general.architecture", path=path)
        spec = spec_for_gguf_arch(arch, path)
        alpha = reader.number(gguf.Keys.Adapter.LORA_ALPHA) or 0.0
        n_layer, heads = block_count(reader, arch, model=False), head_counts(reader, arch, model=False)
        pairs, ignored = lora_pairs(reader)
        ranks = {stem: check_pair(reader, stem, a, b, stem == TOKEN_EMBD) for stem, (a, b) in pairs.items()}
        check_widths(reader, pairs, fused_qkv=bool(spec.conv1d), fused_up=spec.fused_gate_up)
        info: GgufBase | None = None
        if base is not None:
            info = load_base(base)
            _same_base(path, arch, n_layer, heads, info)
        elif heads is not None and n_layer is not None:
            info = GgufBase(str(path), spec, n_layer, *heads, tied=False)
        if pairs and info is None:
            raise UsageError(
                f"{path}: a GGUF adapter without {arch}.block_count / head counts; its names and Q/K rows need "
                "the base",
                hint="pass --base (the .gguf model or Hugging Face folder it was made for)",
            )
        modules: dict[str, LoraModule] = {}
        for stem, (ta, tb) in sorted(pairs.items()):
            assert info is not None
            module = info.hf_module(stem)
            if module is None:
                raise UnsupportedError(f"{path}: no Hugging Face module corresponds to {stem} ({arch})", path=path)
            a, up = _factors(path, reader, info, stem, ta, tb)
            emb = stem == TOKEN_EMBD
            modules[module] = LoraModule(
                down=a.T.contiguous() if emb else a,
                up=up.contiguous(),
                alpha=alpha if alpha else float(ranks[stem]),
                kind="embedding" if emb else "linear",
                fan_in_fan_out=module.rsplit(".", 1)[-1] in spec.conv1d,
            )
        return Adapter(
            modules=modules,
            meta={
                "format": "gguf",
                "base_model": reader.string(_BASE_KEY),
                "gguf_arch": arch,
                "gguf_alpha": alpha,
                "gguf_base": (
                    {"arch": arch, "n_layer": info.n_layer, "n_head": info.n_head, "n_head_kv": info.n_head_kv}
                    if info is not None
                    else None
                ),
                "ignored_tensors": ignored,
                "alora_invocation_tokens": invocation_tokens(reader),
                "provenance": _provenance(reader.string(_PROVENANCE_KEY)),
                "files": [str(path)],
            },
        )


def _factors(path: Path, reader: Any, info: GgufBase, stem: str, ta: Any, tb: Any) -> tuple[Any, Any]:
    """(lora_a, lora_b with the converter's Q/K row permutation undone) as torch tensors."""
    from loratools.errors import ShapeError
    from loratools.formats.gguf.names import read_tensor
    from loratools.formats.gguf.rewrites import is_permuted, rows_from_gguf

    a, b = read_tensor(path, ta.name, reader), read_tensor(path, tb.name, reader)
    try:
        return a, (rows_from_gguf(info, stem, b) if is_permuted(info, stem) else b)
    except ShapeError as exc:
        raise FormatError(
            f"{path}: tensor {tb.name}: {exc.message} ({info.arch}.attention.head_count of {info.source})", path=path
        ) from None


def _same_base(path: Path, arch: str, n_layer: int | None, heads: tuple[int, int] | None, info: GgufBase) -> None:
    """The adapter's own architecture, block and head counts (where it says them) are the base's: the Q/K
    rows and names are read with the base's, so another model's adapter would be read wrongly."""
    from loratools.errors import ValidationError

    own = {"general.architecture": arch, f"{arch}.block_count": n_layer}
    if heads is not None:
        own |= {f"{arch}.attention.head_count": heads[0], f"{arch}.attention.head_count_kv": heads[1]}
    theirs = [info.arch, info.n_layer, info.n_head, info.n_head_kv]
    for (key, mine), other in zip(own.items(), theirs, strict=False):
        if mine is not None and mine != other:
            raise ValidationError(
                f"{path}: written for a base with {key} {mine}, but {info.source} has {other}",
                hint="pass the base the adapter was converted for",
                path=path,
            )


def invocation_tokens(reader: Any) -> list[int] | None:
    """``adapter.alora.invocation_tokens``: an array of non-negative integers, or None when absent."""
    import gguf

    from loratools.files.gguf_file import INTEGER_TYPES

    key = gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS
    f = reader.get_field(key)
    if f is None:
        return None
    if not f.is_array or f.types[1] not in INTEGER_TYPES:
        raise FormatError(
            f"{reader.path}: metadata {key} is stored as {reader.describe(key)}, expected an array of token ids",
            path=reader.path,
        )
    tokens = f.contents()
    if any(t < 0 for t in tokens):
        raise FormatError(f"{reader.path}: metadata {key} holds a negative token id", path=reader.path)
    return tokens


def _provenance(text: str | None) -> Any:
    """The loratools provenance record, None when absent or unreadable (it is informational only)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
