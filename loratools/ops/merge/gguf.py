"""Merge LoRA adapters into a GGUF base model, streaming: one tensor in memory at a time.

The output keeps the base's metadata and tokenizer (every key/value copied, as the ``gguf`` package's
``gguf_new_metadata.py`` copies them) and its tensor order. Tensors no adapter touches are copied byte
for byte, in the kernel. A touched tensor is decoded (:mod:`loratools.ops.merge.gguf_tensors`: bytes
identical to the ``gguf`` package's, two buffers reused from tensor to tensor), updated in fp32 with
Σ wᵢ·ΔWᵢ in the GGUF layout (the same pairs a GGUF adapter holds: each module's exact scale, the
converter's Q/K row permutation, token_embd's rule), and written back in its own type when the package
can write it (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4) and for the K-quants Q2_K..Q6_K
(:mod:`.kquant_encode`, llama.cpp's reference quantizers byte for byte); I-quant and other tensors are written
as F16, as llama.cpp's ``llama-export-lora`` does, and are counted in ``retyped``. A MoE base's stacked expert
tensors (``ffn_*_exps``) take each expert's ΔW one expert slice at a time (:mod:`.gguf_experts`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import UsageError, VerificationError
from loratools.ops.merge.gguf_write import copy_metadata
from loratools.ops.merge.gguf_write import tensor_info as _tensor_info  # shared with the diffusion GGUF merge
from loratools.ops.merge.gguf_write import writer_class as _writer_class
from loratools.ops.merge.summary import MergeSummary

if TYPE_CHECKING:
    import numpy as np
    import torch

    from loratools.formats.gguf.names import GgufBase
    from loratools.model.adapter import Adapter
    from loratools.ops.merge.gguf_tensors import Scratch


def is_gguf_base(path: str | Path) -> bool:
    from loratools.formats.gguf.names import is_gguf_file

    return is_gguf_file(path)


def _updates(adapters: Sequence[Adapter], weights: Sequence[float], info: GgufBase) -> dict[str, Any]:
    """GGUF tensor name -> [(lora_a, lora_b·w), ...] for every adapter, each checked like a GGUF adapter; a
    stacked expert tensor (ffn_*_exps) -> {expert: [(lora_a, lora_b·w), ...]} (:mod:`.gguf_experts`)."""
    from loratools.formats.gguf.format import check_plan

    out: dict[str, Any] = {}
    for adapter, w in zip(adapters, weights, strict=True):
        for pair in check_plan(adapter, info, merge=True).pairs:
            update = (pair.lora_a, pair.lora_b * float(w))
            if pair.expert is None:
                out.setdefault(pair.tensor, []).append(update)
            else:
                out.setdefault(pair.tensor, {}).setdefault(pair.expert, []).append(update)
    return out


def _n_pairs(update: Any) -> int:
    return sum(map(len, update.values())) if isinstance(update, dict) else len(update)


def add_updates(w: torch.Tensor, name: str, pairs: list[Any]) -> torch.Tensor:
    """``w += Σ ΔW`` in place (fp32, GGUF layout, scale already in lora_b), as the runtime applies each pair:
    ``B·A``, and ``A·Bᵀ`` for token_embd (see :func:`loratools.formats.gguf.rewrites.delta_as_runtime`)."""
    from loratools.formats.gguf.rewrites import TOKEN_EMBD

    for a, b in pairs:
        if name.endswith(TOKEN_EMBD):
            w.addmm_(a.float(), b.float().T)
        else:
            w.addmm_(b.float(), a.float())
    return w


def _out_type(type_name: str) -> str:
    """A touched tensor keeps its type where :func:`.gguf_tensors.can_encode` says so (the package's encoders;
    MXFP4 equal to libllama's bytes, tests/llamacpp/test_runtime_moe_gptoss_deepseek.py; the K-quants by
    :mod:`.kquant_encode`), else it is written as F16."""
    from loratools.ops.merge.gguf_tensors import can_encode

    return type_name if can_encode(type_name) else "F16"


def _merged(
    t: Any, pairs: list[Any], fd: int, where: Path, name: str | None = None, scratch: Scratch | None = None
) -> tuple[np.ndarray, str]:
    """(encoded array, type name) of base tensor ``t`` plus the update of tensor ``name`` (default: ``t``'s;
    a tied base's output.weight is made from token_embd); a NumericError when the base tensor or the sum
    holds NaN or Inf (the one check every dequantized tensor gets)."""
    from loratools.errors import NumericError, UnsupportedError
    from loratools.ops.merge.gguf_tensors import NotFinite, Scratch, all_finite, decode, encode, read_stored

    scratch = scratch or Scratch()
    try:
        w = decode(read_stored(t, fd, scratch), t, scratch)
    except NotImplementedError:
        raise UnsupportedError(
            f"{where}: tensor {t.name} is stored as {t.type_label}, which the gguf package cannot dequantize",
            path=where,
        ) from None
    add_updates(w, name or t.name, pairs)
    out_type = _out_type(t.type_label)
    try:
        return encode(w, out_type, scratch), out_type  # checks the sum for NaN/Inf as it encodes
    except NotFinite:  # NaN/Inf in the base propagates to the sum: only now look at the base alone
        if not all_finite(decode(read_stored(t, fd, scratch), t, scratch)):
            raise NumericError(
                f"{where}: base tensor {t.name} holds NaN or Inf values",
                path=where,
                hint="the base file is damaged: convert or download it again",
            ) from None
        raise NumericError(
            f"{where}: merging into {t.name} produced NaN or Inf values (or values beyond its {out_type} range)",
            path=where,
            hint="the base or the adapter holds extreme values",
        ) from None


def _require_base(info: Any, adapters: Sequence[Adapter], labels: Sequence[str | None]) -> None:
    """The wrong-base rule (:mod:`loratools.ops.base_match`) against what a GGUF header states: its layer and
    head counts. Not its architecture name: llama.cpp writes a Mistral as ``llama``, so a name differing is no
    evidence."""
    from loratools.ops.base_match import ModelFacts, base_mismatch_error, claimed_base, mismatch

    facts = ModelFacts(
        label=info.source,
        sizes={"num_hidden_layers": info.n_layer, "num_attention_heads": info.n_head,
               "num_key_value_heads": info.n_head_kv},
    )  # fmt: skip
    for adapter, label in zip(adapters, labels, strict=True):
        claim = claimed_base(adapter)
        if claim is None:
            continue
        claim.model_types.clear()  # compared by sizes only (see above)
        claim.families.clear()
        differences = mismatch(claim, facts)
        if differences:
            label = label or str(adapter.meta.get("source") or "the adapter")
            raise base_mismatch_error(label, claim, facts, differences)


def merge_gguf(
    base: str | Path,
    adapters: Sequence[str | Path | Adapter],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    verify: bool = False,
    overwrite: bool = False,
    include: str | None = None,
    exclude: str | None = None,
    trust_tensors: bool = False,
    allow_other_base: bool = False,
) -> MergeSummary:
    """Merge ``adapters`` into the GGUF model ``base`` and write ``output`` (a .gguf file), atomically.

    Every adapter is checked in full against the base's tensor table first (names, shapes, what a GGUF
    LoRA can hold); nothing is written on a problem. ``verify`` re-reads the output before publishing:
    untouched tensors must be byte-identical and touched ones equal to the base plus ΔW as encoded.
    ``trust_tensors`` accepts adapters whose config disagrees with their tensors (see ``loratools.model.ambiguity``);
    ``allow_other_base`` one that says it was trained on another model (:func:`_require_base`).
    """

    from loratools.formats.adapter_io import load_adapter
    from loratools.formats.gguf.names import load_base, open_gguf
    from loratools.model.adapter import Adapter
    from loratools.publishing.publish import atomic_output, describe_input, provenance

    t0 = time.perf_counter()
    base_path = Path(base)
    if not adapters:
        raise UsageError("give at least one adapter to merge")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"{len(weights)} weights for {len(adapters)} adapters", hint="give one --weights per adapter")
    info = load_base(base_path)
    loaded = [a if isinstance(a, Adapter) else load_adapter(a, base=base_path) for a in adapters]  # GGUF: its heads
    if not allow_other_base:
        _require_base(info, loaded, [str(a) if not isinstance(a, Adapter) else None for a in adapters])
    if include or exclude:
        loaded = [a.select(include, exclude) for a in loaded]
    from loratools.model.ambiguity import require_unambiguous

    for a in loaded:
        require_unambiguous(a, trust_tensors=trust_tensors)
    updates = _updates(loaded, weights, info)
    reader = open_gguf(base_path)
    paths = [a for a in adapters if not isinstance(a, Adapter)]
    record = provenance(
        "merge",
        {"weights": list(weights), "include": include, "exclude": exclude},
        {"base": describe_input(base_path), **{f"adapter{i}": describe_input(p) for i, p in enumerate(paths)}},
    )
    retyped: list[str] = []
    layout = output_layout(reader, updates, info)
    with atomic_output(output, overwrite=overwrite, inputs=[base_path, *paths], directory=False) as tmp:
        writer = _writer_class()(tmp, info.arch)
        writer.data_alignment = reader.alignment
        copy_metadata(reader.fields, writer, record, reader.path)
        plan: list[tuple[str, Any, str | None]] = []
        for name, t in layout:
            if name in updates:
                out_type = _out_type(t.type_label)
                writer.add_tensor_info(name, *_tensor_info(t.shape, out_type))
                if out_type != t.type_label:
                    retyped.append(name)
                plan.append((name, t, out_type))
            else:
                writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
                plan.append((name, t, None))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()  # header written and flushed: the data section is ours
        written = _write_tensors(plan, updates, base_path, writer.fout[0].fileno(), reader.alignment)
        writer.close()
        if verify:
            verify_gguf_merge(base_path, Path(tmp), updates, info)
    return MergeSummary(
        output=Path(output),
        modules_merged=sum(map(_n_pairs, updates.values())),
        tensors_changed=len(updates),
        tensors_written=len(plan),
        bytes_written=written,
        seconds=time.perf_counter() - t0,
        files=[Path(output).name],
        retyped=retyped,
        untied=["output.weight", "token_embd.weight"] if len(layout) > len(reader.tensors) else [],
        verified=True if verify else None,
    )


def _write_tensors(
    plan: list[tuple[str, Any, str | None]], updates: dict[str, Any], base: Path, fd: int, alignment: int
) -> int:
    """The data section at ``fd``: untouched tensors file to file in the kernel, touched ones merged and
    written from the scratch buffer they were encoded into, each write overlapping the next tensor's merge
    (buffers freed on return, before a --verify). Bytes of tensor data written."""
    from loratools.ops.merge.gguf_experts import write_experts
    from loratools.ops.merge.gguf_tensors import DataSection, Scratch
    from loratools.ops.merge.pipeline import torch_threads

    data, scratch, written = DataSection(fd, alignment), Scratch(slots=2), 0
    try:
        # one compute thread fewer, a core for the writer: OpenMP workers spinning beside it made a 5 s
        # merge take 12-28 s on 2 busy cores
        with open(base, "rb") as src, torch_threads():
            for name, t, out_type in plan:
                if out_type is None:
                    data.copy(src.fileno(), t.data_offset, int(t.n_bytes))
                    written += int(t.n_bytes)
                elif isinstance(updates[name], dict):  # a stacked expert tensor: one expert at a time
                    written += write_experts(t, updates[name], out_type, src.fileno(), base, data, scratch, _merged)
                else:
                    scratch.next_slot()  # the other byte buffer, once the writer is done with it
                    encoded = _merged(t, updates[name], src.fileno(), base, name, scratch)[0]
                    scratch.lend(data.write(encoded))
                    written += int(encoded.nbytes)
            data.close()  # the base stays open until every copy from it is done
    except BaseException:
        data.close(wait_only=True)
        raise
    return written


def output_layout(reader: Any, updates: dict[str, Any], info: GgufBase) -> list[tuple[str, Any]]:
    """(name written, base tensor read) in the output's order: the base's own, and for a tied base whose
    lm_head or token_embd an adapter changes, ``output.weight`` made from the original ``token_embd``
    right after it (the runtime reuses token_embd only when there is no output.weight)."""
    from loratools.formats.gguf.plan import OUTPUT
    from loratools.formats.gguf.rewrites import TOKEN_EMBD

    out = []
    untie = info.tied and (OUTPUT in updates or TOKEN_EMBD in updates)
    for t in reader.tensors:
        out.append((t.name, t))
        if untie and t.name == TOKEN_EMBD:
            out.append((OUTPUT, t))
    return out


def verify_gguf_merge(base: Path, merged: Path, updates: dict[str, Any], info: GgufBase) -> None:
    """Untouched tensors byte-identical, touched ones equal to base + ΔW as their type encodes it (an
    untied output.weight: the base's token_embd + its own ΔW)."""
    from loratools.formats.gguf.names import open_gguf
    from loratools.ops.merge.gguf_experts import verify_experts
    from loratools.ops.merge.gguf_tensors import Scratch, same_bytes

    before, after = open_gguf(base), open_gguf(merged)
    layout = output_layout(before, updates, info)
    if [name for name, _ in layout] != [t.name for t in after.tensors]:
        raise VerificationError(f"{merged}: tensor names or order differ from the base {base}")
    scratch = Scratch()
    with open(base, "rb") as fa, open(merged, "rb") as fb:
        a, b = fa.fileno(), fb.fileno()
        for (name, old), new in zip(layout, after.tensors, strict=True):
            if name not in updates:
                same = old.tensor_type == new.tensor_type and old.n_bytes == new.n_bytes
                if not same or not same_bytes(b, new.data_offset, (a, old.data_offset, int(old.n_bytes))):
                    raise VerificationError(f"{merged}: untouched tensor {name} is not byte-identical to the base")
                continue
            if isinstance(updates[name], dict):
                if not verify_experts(old, new, updates[name], _out_type(old.type_label), (a, b), base, scratch,
                                      _merged):  # fmt: skip
                    raise VerificationError(f"{merged}: tensor {name} is not the base plus the experts' ΔW")
                continue
            want, out_type = _merged(old, updates[name], a, base, name, scratch)
            same = new.type_label == out_type and new.n_bytes == want.nbytes
            if not same or not same_bytes(b, new.data_offset, want):  # read back in chunks
                raise VerificationError(f"{merged}: tensor {name} is not the base plus the adapters' ΔW")
