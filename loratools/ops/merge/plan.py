"""What a merge will do to each base tensor, decided and validated before anything is written.

``build_plan`` resolves every adapter module and replacement to a base tensor (tied output heads
included), checks shapes, finite values and the refusals (DoRA with a weight other than 1 or sharing
its module, two adapters replacing one tensor, quantized bases), and returns one :class:`TensorJob`
per output tensor that differs from a plain copy. ``compute`` / ``apply_inplace`` (ops/merge/apply.py,
re-exported here) apply a job in fp32: W' = R or W, + Σ w_i·scale_i·B_i·A_i (in factor space), DoRA, biases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loratools.errors import NumericError, ShapeError, UnsupportedError, UsageError, ValidationError
from loratools.model.tied import EMBED_SUFFIXES, HEAD_NAMES, untied_head_scale
from loratools.model.tied import is_head as _is_head
from loratools.model.tied import tied_embedding_key as tied_keys
from loratools.ops.merge import families as fam
from loratools.ops.merge.apply import BLOCK_ELEMENTS, apply_inplace, compute  # re-exported: the arithmetic

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter, LoraModule


@dataclass
class Contribution:
    """One adapter's update to a tensor: ``weight``·scale·B·A (or ``weight``·scale·bias)."""

    adapter: int
    module: str
    lora: LoraModule
    weight: float
    #: the rows of the tensor it updates when the module is one part of a fused tensor (OpenCLIP's in_proj)
    rows: tuple[int, int] | None = None
    #: the expert it updates when the tensor is a stack of experts (E, d1, d2) (loratools/model/experts.py)
    expert: int | None = None

    @property
    def coefficient(self) -> float:
        return self.weight * self.lora.scale


@dataclass
class TensorJob:
    """How to produce output tensor ``key``: start from ``source`` (a base key) or ``replacement``."""

    key: str
    source: str | None
    replacement: torch.Tensor | None = None
    deltas: list[Contribution] = field(default_factory=list)
    biases: list[Contribution] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    dtype: str = "F32"
    #: a factor on the result: an untied T5 head carries the decoder rescale its tied model applied (model/tied.py)
    scale: float = 1.0
    #: (base inputs, written inputs) of an input layer widened by ``merge --expand-base`` (ops/merge/widen.py)
    widened: tuple[int, int] | None = None

    @property
    def dora(self) -> Contribution | None:
        return next((c for c in self.deltas if not fam.is_family(c) and c.lora.magnitude is not None), None)

    @property
    def is_copy(self) -> bool:
        """A plain copy of a base tensor (possibly under another name: an untied head)."""
        return self.replacement is None and not self.deltas and not self.biases and self.scale == 1


@dataclass
class MergePlan:
    jobs: dict[str, TensorJob]
    new_keys: dict[str, str]  # output key not in the base -> base key it sits next to
    untied: list[str]
    vocab_size: int | None
    modules_merged: int
    #: base key -> (old, new) inputs of the input layers ``--expand-base`` widened (ops/merge/widen.py)
    widened: dict[str, tuple[int, int]] = field(default_factory=dict)


def _located(
    exc: ShapeError | UnsupportedError, j: TensorJob, adapters: list[Adapter], reader: CheckpointReader
) -> Exception:
    """``exc`` prefixed with the adapter(s) changing ``j`` and suffixed with the base file holding it."""
    sources = sorted({_where(adapters[c.adapter]) for c in [*j.deltas, *j.biases]}) or ["the adapter"]
    base = reader.weight_map.get(j.source) if j.source else None
    message = f"{', '.join(sources)}: {exc.message}" + (f" in the base {base}" if base is not None else "")
    return type(exc)(message, hint=exc.hint, path=exc.path)


def _where(adapter: Adapter) -> str:
    return str(adapter.meta.get("source") or "adapter")


def _check_finite(name: str, where: str, tensor: torch.Tensor) -> None:
    import torch

    if tensor.is_meta:  # a factor left in its file: checked while it was loaded (merge_factors)
        return
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NumericError(
            f"{where}: tensor {name} holds NaN or Inf values",
            hint="the adapter is damaged (a diverged training run?); nothing was written",
        )


def build_plan(reader: CheckpointReader, adapters: list[Adapter], weights: list[float], read=None) -> MergePlan:  # noqa: ANN001
    """Resolve, validate and plan a merge; raises before anything is written. ``read``: a FactorStore's
    reader of factors left in their files (what fusing per-expert modules for a fused base needs)."""
    if len(weights) != len(adapters):
        raise UsageError(f"got {len(weights)} weights for {len(adapters)} adapters")
    from loratools.model.tokens import lower_tokens

    adapters = [lower_tokens(a, reader) for a in adapters]  # PEFT trainable tokens: exact LoRA rows
    from loratools.checkpoint.expert_keymap import lower_experts

    adapters = [lower_experts(a, reader, read) for a in adapters]  # expert slices: the base's per-expert/fused tensors
    from loratools.checkpoint.fused_keymap import lower_fused

    adapters = [lower_fused(a, reader, read) for a in adapters]  # split q/k/v, gate/up <-> Phi-3's fused tensors
    quant = reader.quantization
    if quant and reader.quant is None:  # a scheme checkpoint/quant cannot dequantize
        raise UnsupportedError(
            f"{reader.root}: the base is quantized ({quant}); merging into quantized weights loses the adapter",
            hint="dequantize the base to fp16/bf16 first, merge, then quantize the merged model",
        )
    from loratools.checkpoint.keymap import WeightTargets

    keys = set(reader.keys())
    target = WeightTargets(reader)
    emb_key = tied_keys(reader)
    jobs: dict[str, TensorJob] = {}
    new_keys: dict[str, str] = {}
    replaced_by: dict[str, int] = {}

    def job(key: str) -> TensorJob:
        if key not in jobs:
            jobs[key] = TensorJob(key=key, source=key if key in keys else None)
        return jobs[key]

    def head_source(name: str) -> str | None:
        """A tied output head missing from the base reads the input embedding."""
        if emb_key and name.rsplit(".", 1)[-1] in HEAD_NAMES:
            return emb_key
        return None

    modules_merged = 0
    for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
        where = _where(adapter)
        for key, tensor in adapter.replacements.items():
            _check_finite(key, where, tensor)
            module = key.rpartition(".")[0]
            base_layer = module in adapter.modules  # a saved embedding base layer, not a trained copy
            if not base_layer and w != 1:
                raise UnsupportedError(
                    f"{where}: replaces {key} in full (modules_to_save); a full replacement cannot be weighted by {w}",
                    hint="merge this adapter with weight 1, or exclude that module with --exclude",
                )
            j = job(key)
            if key not in keys:
                src = head_source(module)
                if src is None and not base_layer:
                    new_keys[key] = _neighbour(key, reader)
                elif src is not None:
                    j.source = src
                    new_keys[key] = src
                else:
                    _missing(where, module, reader)
            if j.replacement is not None and key in replaced_by:
                if replaced_by[key] != i and not _same(j.replacement, tensor):
                    raise UnsupportedError(
                        f"{where} and {_where(adapters[replaced_by[key]])} both replace {key}",
                        hint="merge them one at a time or drop the module from one with --exclude",
                    )
            j.replacement, replaced_by[key] = tensor, i
        for name, lora in adapter.modules.items():
            from loratools.model.adapter import module_tensors

            for t_name, t in module_tensors(lora).items():
                _check_finite(f"{name}.{t_name}", where, t)
            expert = getattr(lora, "expert", None) if getattr(lora, "parameter", None) in keys else None
            key, rows = (lora.parameter, None) if expert is not None else target(name)
            if key not in keys and key not in jobs:
                src = head_source(name)
                if src is None:
                    _missing(where, name, reader, getattr(lora, "weight_shape", None))
                job(key).source = src
                new_keys[key] = src
            c = Contribution(i, name, lora, w, rows, expert)
            job(key).deltas.append(c)
            modules_merged += 1
            if fam.is_family(c) and lora.bias_factor() is not None and f"{name}.bias" in keys:
                job(f"{name}.bias").biases.append(c)  # (IA)³ on the output side scales the base bias too
            if getattr(lora, "bias", None) is not None:
                _check_finite(f"{name}.lora_B.bias", where, lora.bias)
                bkey = f"{name}.bias"
                if bkey not in keys:
                    raise ValidationError(
                        f"{where}: module {name} has a LoRA bias (lora_B.bias) but the base has no {bkey}",
                        hint="PEFT cannot merge lora_bias into a layer without a bias either",
                    )
                job(bkey).biases.append(c)

    untied: list[str] = []
    if emb_key:
        heads = sorted({k for k in (*keys, *jobs) if _is_head(k)})
        if emb_key in jobs or any(h in jobs for h in heads):
            for head in heads or ["lm_head.weight"]:
                if head not in keys and head not in jobs:
                    job(head).source = emb_key
                    new_keys[head] = emb_key
                if job(head).source == emb_key or head not in keys:  # the head was the embedding itself
                    job(head).scale = untied_head_scale(reader.config)
            job(emb_key)
            untied = sorted({emb_key, *(heads or ["lm_head.weight"])})

    from loratools.ops.merge.widen import widen_jobs

    widened = widen_jobs(jobs, reader)  # --expand-base: a control LoRA's wider img_in/x_embedder
    vocab_size = None
    for j in jobs.values():
        try:
            _finish(j, reader, emb_key)
        except (ShapeError, UnsupportedError) as exc:  # name the adapter file(s) and the base file, not just the module
            raise _located(exc, j, adapters, reader) from None
        if j.key == (emb_key or "") or j.key.endswith(EMBED_SUFFIXES):
            if j.source in keys and j.shape[:1] != tuple(reader.info(j.source).shape[:1]):
                vocab_size = j.shape[0]
    return MergePlan(jobs, new_keys, untied, vocab_size, modules_merged, widened)


def _neighbour(key: str, reader: CheckpointReader) -> str:
    keys = reader.keys()
    return keys[-1] if keys else key


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a.float(), b.float()))


def _missing(where: str, module: str, reader: CheckpointReader, shape: tuple[int, ...] | None = None) -> None:
    from loratools.ops.base_match import missing_module_hint

    raise ValidationError(
        f"{where}: module {module} is not in the base {reader.root} (no tensor {module}.weight)",
        hint=missing_module_hint(module, reader, shape=shape),
    )


def _finish(j: TensorJob, reader: CheckpointReader, emb_key: str | None) -> None:
    """Fill in shape and dtype, check every contribution against them and apply the DoRA refusals."""
    from loratools.files.safetensors_file import dtype_name

    if j.replacement is not None:
        shape = tuple(j.replacement.shape)
        dtype = reader.info(j.source).dtype if j.source else dtype_name(j.replacement.dtype)
        if j.source is not None:
            base_shape = tuple(reader.info(j.source).shape)
            resized = len(shape) == 2 and len(base_shape) == 2 and shape[1:] == base_shape[1:]
            if shape != base_shape and not resized and j.widened is None:
                raise ShapeError(
                    f"replacement for {j.key} has shape {shape}, the base tensor {j.source} is {base_shape}",
                    hint="the adapter was saved from a different model",
                )
    else:
        info = reader.info(j.source)
        shape, dtype = tuple(info.shape), info.dtype
    j.shape, j.dtype = shape, dtype
    fam.check(j)
    for c in j.deltas:
        if fam.is_family(c):
            continue
        want = tuple(c.lora.weight_shape)
        if not _fits(c, shape):
            from loratools.ops.merge.widen import widen_advice

            raise ShapeError(
                f"adapter module {c.module} (rank {c.lora.rank}) expects a weight of shape {want}, "
                f"the base tensor {j.source or j.key} is {shape}"
                + (f" (its rows {c.rows[0]}:{c.rows[1]} are this module)" if c.rows else "")
                + (f" (its expert {c.expert} is this module)" if c.expert is not None else "")
                + widen_advice(j.key, want, shape),
                hint="the adapter was trained on a different model size or layout",
            )
        if c.lora.magnitude is not None:
            if c.rows is not None:
                raise UnsupportedError(
                    f"module {c.module} is DoRA and only rows {c.rows[0]}:{c.rows[1]} of {j.key} are its weight; "
                    "DoRA's per-row norms of a fused tensor are not defined",
                    hint="merge it into the model as a diffusers pipeline folder instead",
                )
            if c.weight != 1:
                raise UnsupportedError(
                    f"module {c.module} is DoRA; DoRA cannot be merged with weight {c.weight} "
                    "(its magnitude rescaling is not linear in the update)",
                    hint="merge DoRA adapters with weight 1",
                )
            if len(j.deltas) > 1:
                raise UnsupportedError(
                    f"module {c.module} is DoRA and another adapter also changes {j.key}; "
                    "DoRA's normalization makes their sum ill-defined",
                    hint="merge the DoRA adapter alone first, then merge the others into its output",
                )
            if int(c.lora.magnitude.numel()) != c.lora.out_features:
                raise ShapeError(
                    f"DoRA magnitude of {c.module} has {c.lora.magnitude.numel()} values, "
                    f"the module has {c.lora.out_features} outputs"
                )
    for c in j.biases:
        if not fam.is_family(c) and tuple(c.lora.bias.shape) != shape:
            raise ShapeError(f"LoRA bias of {c.module} is {tuple(c.lora.bias.shape)}, the base bias is {shape}")


def _fits(c: Contribution, shape: tuple[int, ...]) -> bool:
    """The module's weight shape is the tensor's (its rows of it for a fused part), or the same matrix as a
    linear weight / 1×1 conv (:func:`~loratools.checkpoint.keymap.same_matrix`)."""
    from loratools.checkpoint.keymap import same_matrix

    if c.expert is not None:  # one expert of a stacked (E, d1, d2) tensor
        return len(shape) == 3 and c.expert < shape[0] and tuple(c.lora.weight_shape) == shape[1:]
    if c.rows is not None:
        if c.lora.transposed or len(shape) != 2:
            return False
        shape = (c.rows[1] - c.rows[0], *shape[1:])
    want = tuple(c.lora.weight_shape)
    return want == shape or (not c.lora.transposed and same_matrix(want, shape))


__all__ = ["BLOCK_ELEMENTS", "Contribution", "MergePlan", "TensorJob", "apply_inplace", "build_plan", "compute"]
