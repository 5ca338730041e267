"""Merge diffusion-transformer LoRAs into a GGUF diffusion checkpoint as ComfyUI-GGUF writes it, streaming.

The base (:mod:`loratools.checkpoint.gguf_diffusion`) holds the original-layout names, so the adapters are read and
planned exactly as for an original-layout safetensors single file (``load_for_merge`` + ``build_plan``: the DiT name
tables, fused ``qkv``/``linear1`` rows, shapes checked against the base, every refusal); only reading and writing
differ.
Tensors no adapter touches are copied byte for byte, in the kernel; the metadata (``comfy.gguf.orig_shape.*``
included) and the tensor order are the base's. A touched tensor is read into a reused buffer and:

* F32 / F16 / BF16: updated in place in its own dtype by the safetensors merge's own function
  (``apply_inplace``: fp32 row blocks, one rounding), so the bytes equal that merge's;
* Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (the types the ``gguf`` package encodes) and the K-quants Q2_K..Q6_K
  (:mod:`.kquant_encode`: llama.cpp's reference quantizers, byte for byte): dequantized to fp32, updated,
  requantized to the same type (bytes identical to ``gguf.quants.quantize`` / ggml's ``quantize_row_*_ref``);
* I-quants and the rest (IQ4_XS, IQ2_XXS, TQ1_0 ...), which the package decodes but nothing here encodes: written
  as F16, listed in ``retyped`` (as llama.cpp's ``llama-export-lora`` does; ComfyUI-GGUF loads any type per tensor).

Memory: one tensor's bytes and its fp32 values (two byte buffers while the writer thread writes the previous one).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import NumericError, UnsupportedError, VerificationError
from loratools.ops.merge.gguf_tensors import ENCODABLE
from loratools.ops.merge.summary import MergeSummary

if TYPE_CHECKING:
    import numpy as np

    from loratools.checkpoint.gguf_diffusion import DitTensorInfo, GgufDitBase
    from loratools.model.adapter import Adapter
    from loratools.ops.merge.factors import FactorStore
    from loratools.ops.merge.gguf_tensors import Scratch
    from loratools.ops.merge.options import MergeOptions
    from loratools.ops.merge.plan import TensorJob

#: stored types written back in their own type after merging (:func:`.gguf_tensors.can_encode`: the gguf package's
#: encoders, and ours for the K-quants)
KEEP_TYPES = ENCODABLE
#: what a touched tensor of any other type becomes
FALLBACK_TYPE = "F16"


def out_type(stored: str) -> str:
    return stored if stored in KEEP_TYPES else FALLBACK_TYPE


def merge_gguf_diffusion(
    base: str | Path, base_path: Path, adapters: Sequence[str | Path | Adapter], output: str | Path,
    options: MergeOptions,
) -> MergeSummary:  # fmt: skip
    """Merge ``adapters`` into the ComfyUI-GGUF diffusion file ``base_path`` and publish ``output`` atomically.
    Everything is checked (names, shapes, finite values) before a byte is written; ``options.verify`` reads the
    output back before publishing (untouched tensors byte-identical, touched ones the merge's bytes)."""
    from loratools.args.numeric_args import check_weights
    from loratools.checkpoint.gguf_diffusion import GgufDitBase
    from loratools.ops.merge.factors import FactorStore, load_for_merge, release_memory
    from loratools.ops.merge.pipeline import torch_threads
    from loratools.ops.merge.plan import build_plan
    from loratools.publishing.publish import atomic_output, describe_input, provenance

    t0, o = time.perf_counter(), options
    weights = check_weights(o.weights, len(adapters))
    reader = GgufDitBase(base_path)
    factors = FactorStore()
    try:
        with torch_threads():  # one compute thread fewer: the writer thread gets a core
            loaded = load_for_merge(
                reader, adapters, factors, include=o.include, exclude=o.exclude, trust_tensors=o.trust_tensors,
                allow_other_base=o.allow_other_base,
            )  # fmt: skip
            plan = build_plan(reader, loaded, weights, read=factors.read)
            _refuse_new(plan, reader)
            jobs = {k: j for k, j in plan.jobs.items() if not j.is_copy}
            release_memory()
            paths = [a for a in adapters if isinstance(a, str | Path)]
            record = provenance(
                "merge",
                {"weights": list(weights), "include": o.include, "exclude": o.exclude},
                {"base": describe_input(base_path), **{f"adapter{i}": describe_input(p) for i, p in enumerate(paths)}},
            )
            retyped = [k for k in jobs if out_type(reader.info(k).stored_type) != reader.info(k).stored_type]
            with atomic_output(output, overwrite=o.overwrite, inputs=[base_path, *paths], directory=False) as tmp:
                written = _write(reader, jobs, factors, Path(tmp), record)
                if o.verify:
                    verify_dit_gguf(reader, Path(tmp), jobs, factors)
    finally:
        factors.close()
        reader.close()
    return MergeSummary(
        output=Path(output),
        modules_merged=plan.modules_merged,
        tensors_changed=len(jobs),
        tensors_written=len(reader.file.tensors),
        bytes_written=written,
        seconds=time.perf_counter() - t0,
        files=[Path(output).name],
        retyped=retyped,
        verified=True if o.verify else None,
    )


def _refuse_new(plan: Any, reader: GgufDitBase) -> None:
    """A GGUF merge rewrites the base's tensors in place in the layout: none added, none resized."""
    for key, j in plan.jobs.items():
        if j.replacement is not None and key in reader and tuple(j.shape) != reader.info(key).shape:
            raise UnsupportedError(
                f"{reader.root}: the adapter replaces {key} with a tensor of shape {tuple(j.shape)}, the base's is "
                f"{reader.info(key).shape}; a merge into a GGUF file keeps every tensor's shape",
                hint="merge into the model's safetensors single file instead, or leave that module out with --exclude",
                path=reader.root,
            )
    if plan.new_keys:
        key = sorted(plan.new_keys)[0]
        raise UnsupportedError(
            f"{reader.root}: the adapter adds tensor {key}, which the GGUF base does not hold; a merge into a "
            "GGUF file rewrites its tensors and adds none",
            hint="merge into the model's safetensors single file instead, or leave that module out with --exclude",
            path=reader.root,
        )


def merged_bytes(
    reader: GgufDitBase, info: DitTensorInfo, job: TensorJob, factors: FactorStore, fd: int, scratch: Scratch
) -> np.ndarray:
    """Base tensor ``info`` plus its job's updates, encoded as :func:`out_type` says (a flat uint8 array in the
    scratch byte buffer); a NumericError naming the base and the tensor on NaN/Inf or an overflow of F16."""

    from loratools.files.safetensors_file import torch_dtype
    from loratools.ops.merge.gguf_tensors import NotFinite, all_finite, decode, encode, read_stored
    from loratools.ops.merge.plan import BLOCK_ELEMENTS, apply_inplace, compute

    t, stored_type = info.tensor, info.stored_type
    target = out_type(stored_type)
    job = factors.resolve(job)
    generic = any(not hasattr(c.lora, "factors") for c in (*job.deltas, *job.biases))  # LoHa, LoKr, OFT ...
    inplace = job.replacement is None and job.dora is None and not generic and job.scale == 1
    try:
        stored = read_stored(t, fd, scratch)
        if job.replacement is None and stored_type in ("F16", "BF16") and inplace:
            w = stored.view(torch_dtype(stored_type)).view(info.shape)  # as the safetensors merge does it
            apply_inplace(job, w, scratch.work(BLOCK_ELEMENTS + w[0].numel()))
            if not all_finite(w):
                raise NotFinite
            return stored.numpy()
        if job.replacement is not None:
            w = compute(job, None)
        else:
            w = decode(stored, t, scratch).view(info.shape)
            w = apply_inplace(job, w) if inplace else compute(job, w)
        return encode(w.contiguous(), target, scratch)
    except NotImplementedError:
        raise UnsupportedError(
            f"{reader.root}: tensor {t.name} is stored as {stored_type}, which the gguf package cannot dequantize",
            path=reader.root,
        ) from None
    except (NotFinite, NumericError):  # NaN/Inf in the base propagates to the sum: only now look at the base alone
        if not all_finite(decode(read_stored(t, fd, scratch), t, scratch)):
            raise NumericError(
                f"{reader.root}: base tensor {t.name} ({stored_type}) holds NaN or Inf values",
                hint="the base file is damaged: convert or download it again",
                path=reader.root,
            ) from None
        raise NumericError(
            f"{reader.root}: merging into {t.name} produced NaN or Inf values (or values beyond its {target} range)",
            hint="the base or the adapter holds extreme values (check the base with `loratools info`); "
            "nothing was written",
            path=reader.root,
        ) from None


def _write(reader: GgufDitBase, jobs: dict[str, TensorJob], factors: FactorStore, tmp: Path, record: dict) -> int:
    """The whole output file at ``tmp``; bytes of tensor data written."""
    from loratools.ops.merge.gguf_tensors import DataSection, Scratch
    from loratools.ops.merge.gguf_write import copy_metadata, tensor_info, writer_class

    writer = writer_class()(tmp, reader.arch)
    if not reader.arch:  # a stable-diffusion.cpp file states none: neither does its merge
        writer.kv_data[0].pop("general.architecture", None)
    writer.data_alignment = reader.file.alignment
    copy_metadata(reader.file.fields, writer, record, reader.root)
    for t in reader.file.tensors:
        if t.name in jobs:
            writer.add_tensor_info(t.name, *tensor_info(t.shape, out_type(t.type_label)))
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()  # header written and flushed: the data section is ours
    data, scratch, written, src = DataSection(writer.fout[0].fileno(), reader.file.alignment), Scratch(slots=2), 0, 0
    try:
        src = reader.fd()
        for t in reader.file.tensors:
            if t.name not in jobs:
                data.copy(src, t.data_offset, int(t.n_bytes))
                written += int(t.n_bytes)
                continue
            scratch.next_slot()  # the other byte buffer, once the writer is done with it
            encoded = merged_bytes(reader, reader.info(t.name), jobs[t.name], factors, src, scratch)
            scratch.lend(data.write(encoded))
            written += int(encoded.nbytes)
        data.close()
    except BaseException:
        data.close(wait_only=True)
        raise
    writer.close()
    return written


def verify_dit_gguf(reader: GgufDitBase, merged: Path, jobs: dict[str, TensorJob], factors: FactorStore) -> None:
    """The output read back: the base's tensors in its order, untouched ones byte-identical, touched ones the
    merge's bytes recomputed from the base and the adapters."""
    from loratools.checkpoint.gguf_diffusion import MAX_DIMS
    from loratools.files.gguf_file import open_gguf_file
    from loratools.ops.merge.gguf_tensors import Scratch, same_bytes

    after = open_gguf_file(merged, MAX_DIMS)
    if [t.name for t in after.tensors] != [t.name for t in reader.file.tensors]:
        raise VerificationError(f"{merged}: tensor names or order differ from the base {reader.root}")
    scratch, a = Scratch(), reader.fd()
    with open(merged, "rb") as fb:
        b = fb.fileno()
        for old, new in zip(reader.file.tensors, after.tensors, strict=True):
            if old.name not in jobs:
                same = old.type_code == new.type_code and old.n_bytes == new.n_bytes and old.dims == new.dims
                if not same or not same_bytes(b, new.data_offset, (a, old.data_offset, int(old.n_bytes))):
                    raise VerificationError(f"{merged}: untouched tensor {old.name} is not byte-identical to the base")
                continue
            want = merged_bytes(reader, reader.info(old.name), jobs[old.name], factors, a, scratch)
            same = new.type_label == out_type(old.type_label) and new.n_bytes == want.nbytes and old.dims == new.dims
            if not same or not same_bytes(b, new.data_offset, want):
                raise VerificationError(f"{merged}: tensor {old.name} is not the base plus the adapters' ΔW")


__all__ = ["FALLBACK_TYPE", "KEEP_TYPES", "merge_gguf_diffusion", "merged_bytes", "out_type", "verify_dit_gguf"]
