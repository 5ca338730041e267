"""Merge LoRA deltas straight into an exported ONNX model's initializers (no PyTorch export).

Each adapter module is matched to its weight by parameter name, directly or through onnxscript's
``folded_from`` metadata (:mod:`loratools.onnx.graph`); the layout comes from the graph. Initializers
are streamed from wherever their ``location`` points into one new external data file; only the
patched weights are ever materialized, in fp32, and cast once to their stored dtype.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.args.numeric_args import check_weights
from loratools.errors import UnsupportedError, UsageError, ValidationError
from loratools.onnx.dropped import read_dropped
from loratools.onnx.graph import GraphIndex, WeightSite, check_shape
from loratools.onnx.store import InitializerSource, external_info, load_graph, model_path, tensor_nbytes, write_model
from loratools.onnx.verify_merge import refuse_checkpoint_options, verify_patched

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter, LoraModule

#: patched weights read and updated ahead of the writer
AHEAD = 2


@dataclass
class OnnxMergeResult:
    """What :func:`merge_onnx` did."""

    output: Path
    modules: int
    adapters: int
    seconds: float
    data_bytes: int
    folded: int = 0  # modules found through folded_from metadata
    weights: list[float] = field(default_factory=list)
    #: module -> why it was left out (its weight is not in the graph)
    skipped: dict[str, str] = field(default_factory=dict)
    #: worst relative error of the patched weights read back (None: not verified)
    verify_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "modules": self.modules,
            "modules_merged": self.modules,  # the names `loratools merge` prints for checkpoints
            "bytes_written": self.data_bytes,
            "format": "onnx",
            "adapters": self.adapters,
            "folded": self.folded,
            "weights": self.weights,
            "seconds": round(self.seconds, 3),
            "data_bytes": self.data_bytes,
            "skipped": self.skipped,
            "verified": None if self.verify_error is None else True,
            "verify_error": self.verify_error,
        }


def _load(spec: str | Path | Adapter, trust_tensors: bool = False) -> tuple[Adapter, str]:
    from loratools.formats.adapter_io import load_adapter
    from loratools.model.adapter import Adapter
    from loratools.model.ambiguity import require_unambiguous

    loaded, label = (spec, str(spec.meta.get("source", "<adapter>"))) if isinstance(spec, Adapter) else (
        load_adapter(spec), str(spec))  # fmt: skip
    require_unambiguous(loaded, trust_tensors=trust_tensors)
    from loratools.model.adapter import require_lora

    require_lora(loaded, "merge into ONNX")
    return loaded, label


def plan_sites(
    index: GraphIndex,
    adapters: Sequence[tuple[Adapter, str]],
    where: str,
    dropped: set[str] | None = None,
    skip: Sequence[str] = (),
    skipped: dict[str, str] | None = None,
) -> dict[str, list[tuple[WeightSite, LoraModule, int]]]:
    """Initializer name -> [(site, module, adapter number)]; clear errors for anything unresolvable.

    A module without a weight in the graph is left out (and added to ``skipped`` with the reason) when
    ``dropped`` (the export's record of tensors it left out) holds its weight or ``skip`` names it.
    """
    from loratools.checkpoint.keymap import KeyMatcher
    from loratools.errors import NumericError
    from loratools.onnx.dropped import skip_reason

    matcher = KeyMatcher(index.matcher_keys())
    plan: dict[str, list[tuple[WeightSite, LoraModule, int]]] = {}
    for number, (adapter, label) in enumerate(adapters):
        if adapter.replacements:
            first = sorted(adapter.replacements)[0]
            raise UnsupportedError(
                f"{label}: full replacement tensors ({first}, modules_to_save) cannot be merged into an ONNX model",
                hint="merge into the checkpoint (`loratools merge`) and export that with `loratools export-onnx`",
            )
        missing = []
        for name, module in adapter.modules.items():
            if module.magnitude is not None or module.bias is not None or module.kind == "conv":
                what = (
                    "DoRA" if module.magnitude is not None else ("a LoRA bias" if module.bias is not None else "conv")
                )
                raise UnsupportedError(
                    f"{label}: module {name} uses {what}, which merge-into-ONNX does not support",
                    hint="merge into the checkpoint with `loratools merge`, then `loratools export-onnx` it",
                )
            parameter = matcher.tensor_key(name, "weight")
            reason = skip_reason(name, dropped, skip) if parameter is None or name in skip else None
            if reason is not None:
                if skipped is not None:
                    skipped[name] = reason
                continue
            if parameter is None:
                missing.append(name)
                continue
            site = index.site(parameter, where)
            if module.kind == "embedding" and site.layout != "embedding":
                raise UnsupportedError(f"{where}: {parameter} is not an embedding table, but {label} treats it as one")
            if module.kind != "embedding" and site.layout == "embedding":
                raise UnsupportedError(f"{where}: {parameter} is an embedding table; {label} adapts it as a linear")
            if module.kind == "embedding":
                expected = (module.in_features, module.out_features)
                if site.shape != expected:
                    raise ValidationError(
                        f"{where}: {parameter} is {list(site.shape)}, adapter expects {list(expected)}"
                    )
            else:
                check_shape(site, module.out_features, module.in_features, where)
            if not math.isfinite(float(module.up.float().sum()) + float(module.down.float().sum())):
                raise NumericError(f"{label}: module {name} has NaN or Inf in its factors")
            plan.setdefault(site.initializer, []).append((site, module, number))
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            recorded = "" if dropped is None else "; the export's record of dropped tensors does not name them"
            raise ValidationError(
                f"{where}: no weight for {len(missing)} module(s) of {label}: {shown} "
                f"(looked up by initializer name and by onnxscript folded_from metadata{recorded})",
                hint="export the model with `loratools export-onnx` (names kept, dropped weights recorded); "
                f"if this graph left them out on purpose, pass --skip-module {missing[0]} (once per module)",
            )
    return plan


def add_delta(acc: torch.Tensor, site: WeightSite, module: LoraModule, weight: float) -> None:
    """acc += weight·scale·B·A in the stored layout of ``site``, in place (fp32, no dense ΔW buffer)."""
    if module.kind == "embedding":
        acc.add_(module.delta(), alpha=weight)
        return
    up, down = module.factors()
    up = up * (module.scale * weight)
    if site.layout == "out_in":
        acc.addmm_(up, down)  # (out, r) @ (r, in)
    else:
        acc.addmm_(down.T, up.T)  # (in, r) @ (r, out)


def merge_onnx(
    onnx_dir: str | Path,
    adapters: Sequence[str | Path | Adapter],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    trust_tensors: bool = False,
    include: str | None = None,
    exclude: str | None = None,
    skip_modules: Sequence[str] = (),
    verify: bool = False,
    allow_other_base: bool = False,
    dtype: str | None = "auto",
    max_shard_size: str | int | None = None,
    device: str = "cpu",
) -> OnnxMergeResult:
    """Merge ``adapters`` (each times its weight, default 1) into the ONNX model at ``onnx_dir``.

    Writes ``output/model.onnx`` plus one ``model.onnx.data`` and copies the folder's other files
    (config, tokenizer). The result equals exporting the merged checkpoint, without a PyTorch export.
    ``include``/``exclude`` pick modules by regex. ``skip_modules`` names modules to leave out although
    the graph does not record dropping their weight (a foreign export); modules whose weight our export
    recorded as dropped are left out anyway. An adapter that says it was trained on another model than the
    one the export's ``config.json`` describes is refused unless ``allow_other_base`` (the rule of
    :mod:`loratools.ops.base_match`). ``verify`` reads every patched weight back from the
    output and checks it against base + update before publishing. ``dtype`` (only ``auto``: weights
    keep their stored dtype), ``max_shard_size`` (one data file is written) and ``device`` (the update
    is computed on the CPU) are refused when set otherwise, not ignored.
    """
    import torch

    from loratools.publishing.hub import resolve_path
    from loratools.publishing.publish import atomic_output, describe_input, provenance

    start = time.perf_counter()
    if not adapters:
        raise UsageError("merge_onnx needs at least one adapter")
    weights = check_weights(weights, len(adapters))
    refuse_checkpoint_options(dtype, max_shard_size, device)
    source_path = resolve_path(onnx_dir, "onnx model")
    model_file = model_path(source_path)
    proto = load_graph(model_file)
    index = GraphIndex(proto)
    loaded = [_load(a, trust_tensors) for a in adapters]
    if not allow_other_base:
        from loratools.ops.base_match import require_base
        from loratools.ops.base_match.facts import FolderBase

        require_base([a for a, _ in loaded], [lab for _, lab in loaded], FolderBase(model_file.parent), onnx_dir)
    unknown = sorted(set(skip_modules) - {m for a, _ in loaded for m in a.modules})
    if unknown:
        raise UsageError(f"--skip-module {unknown[0]}: no adapter has a module of that name")
    if include or exclude:
        loaded = [(a.select(include, exclude), label) for a, label in loaded]
        if not any(a.modules or a.replacements for a, _ in loaded):
            raise UsageError("no adapter module is left to merge", hint="check --include / --exclude")
    skipped: dict[str, str] = {}
    plan = plan_sites(index, loaded, str(model_file), read_dropped(proto, model_file), skip_modules, skipped)
    if not plan:
        raise UsageError("no adapter module has a weight in this graph: nothing to merge")

    def compute(tensor: Any) -> memoryview:
        # round-robin buffers: the one for weight k is reused for weight k + AHEAD + 1, which is only
        # requested after weight k has been written
        slot = position[tensor.name] % (AHEAD + 1)
        if buffers[slot] is None:
            buffers[slot] = torch.empty(largest, dtype=torch.uint8)
        base = source.tensor(tensor, buffers[slot])
        acc = base if base.dtype == torch.float32 else base.to(torch.float32)
        for site, module, number in plan[tensor.name]:
            add_delta(acc, site, module, weights[number])
        out = acc if acc.dtype == base.dtype else acc.to(base.dtype)
        return memoryview(out.reshape(-1).view(torch.uint8).numpy())

    # read + update the next patched weights in a worker while this thread writes (at most AHEAD in flight)
    order = [t for t in proto.graph.initializer if t.name in plan]
    position = {t.name: i for i, t in enumerate(order)}
    largest = max((tensor_nbytes(t) for t in order), default=0)
    buffers: list[Any] = [None] * (AHEAD + 1)
    pool = ThreadPoolExecutor(max_workers=1)
    pending: dict[str, Future] = {}

    def patched(tensor: Any) -> memoryview | None:
        if tensor.name not in position:
            return None
        i = position[tensor.name]
        for ahead in order[i : i + AHEAD]:
            if ahead.name not in pending and position[ahead.name] >= i:
                pending[ahead.name] = pool.submit(compute, ahead)
        return pending.pop(tensor.name).result()

    data_files = {e["location"] for t in proto.graph.initializer if (e := external_info(t))}
    expected = sum((model_file.parent / f).stat().st_size for f in data_files if (model_file.parent / f).is_file())
    record = provenance(
        "merge-onnx",
        {"weights": weights, "modules": sum(len(v) for v in plan.values())},
        {"onnx": describe_input(source_path), "adapters": [describe_input(label) for _, label in loaded]},
    )
    _set_metadata(proto, "loratools", json.dumps(record, sort_keys=True, separators=(",", ":")))
    inputs = [source_path, *(label for _, label in loaded if Path(label).exists())]
    source = InitializerSource(model_file)
    try:
        with atomic_output(output, overwrite=overwrite, inputs=inputs, expected_bytes=expected) as tmp:
            out_file = tmp / model_file.name
            data_bytes = write_model(proto, source, out_file, patched, progress)
            checked = verify_patched(source, out_file, plan, weights) if verify else None
            if source_path.is_dir():
                copy_side_files(source_path, tmp, skip={model_file.name, *data_files})
    finally:
        for future in pending.values():
            future.cancel()
        pool.shutdown(wait=True)
        source.close()
    folded = sum(1 for v in plan.values() for site, _, _ in v if site.initializer != site.parameter)
    return OnnxMergeResult(
        Path(output), sum(len(v) for v in plan.values()), len(loaded), time.perf_counter() - start, data_bytes,
        folded, weights, skipped, checked,
    )  # fmt: skip


def copy_side_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Copy the small files of an ONNX folder (config, tokenizer, manifest), not its models or data."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in skip and f.suffix not in (".onnx", ".data") and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def _set_metadata(proto: Any, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
