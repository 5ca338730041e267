"""Export a Hugging Face checkpoint (optionally merged with adapters) to ONNX with torch.onnx.

The model is built with transformers from the checkpoint's own config, offline, and its weights
loaded from the checkpoint. torch.onnx's dynamo exporter runs with ``optimize=False`` so every
initializer keeps its parameter name and PyTorch layout (onnxruntime folds the transposes itself at
session start); the names are then rewritten to the checkpoint's tensor names. Inputs are
``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT-like models), int64 with dynamic
batch and sequence; the output is ``logits`` or ``last_hidden_state``; no past key values.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.args.numeric_args import Range, check_optional, check_weights
from loratools.errors import FormatError, UnsupportedError, UsageError, VerificationError, require
from loratools.onnx import MAX_OPSET, MIN_OPSET
from loratools.onnx.dropped import dropped_tensors, record_dropped, skip_reason
from loratools.onnx.runtime import max_difference, sample_batches, session, tolerance
from loratools.onnx.store import MODEL_FILE, InitializerSource, load_graph, write_model
from loratools.onnx.tasks import task_of
from loratools.onnx.torch_merge import merge_in_memory

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter

MANIFEST = "loratools_onnx.json"
#: the opsets --opset takes (loratools.onnx.MIN_OPSET..MAX_OPSET)
OPSET = Range(low=MIN_OPSET, high=MAX_OPSET, integer=True)
DTYPES = {"fp32": "float32", "fp16": "float16"}
#: checkpoint files never copied next to the ONNX model
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx", ".data")


@dataclass
class LoadedModel:
    """A transformers model ready to export, and what its ONNX graph will look like."""

    model: torch.nn.Module
    inputs: list[str]
    output: str
    task: str  # see task_of: "causal-lm", "sequence-classification", ..., "encoder"
    vocab_size: int
    aliases: dict[str, list[str]] = field(default_factory=dict)  # canonical parameter -> tied names


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how well it matched PyTorch."""

    output: Path
    task: str
    inputs: list[str]
    outputs: list[str]
    dtype: str
    opset: int | None
    seconds: float
    data_bytes: int
    max_diff: float | None = None
    atol: float | None = None
    merged: list[str] = field(default_factory=list)
    slots: list[str] = field(default_factory=list)
    #: checkpoint tensors the graph does not hold (its outputs do not depend on them)
    dropped: list[str] = field(default_factory=list)
    #: --lora-slots modules left without a slot, and why (their weight is among ``dropped``)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["output"] = str(self.output)
        data["seconds"] = round(self.seconds, 3)
        data["verified"] = self.max_diff is not None
        return data


def load_model(path: str | Path, dtype: str = "fp32", device: str = "cpu") -> LoadedModel:
    """Build the model from ``path``'s config.json (offline) and load its weights from the checkpoint."""
    import inspect

    import torch

    transformers = require("transformers", "onnx")
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FormatError(
            f"{root}: no config.json; export-onnx needs a Hugging Face model folder",
            hint="pass the folder save_pretrained wrote (config.json + weights)",
            path=root,
        )
    config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        causal = type(config) in transformers.AutoModelForCausalLM._model_mapping
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    transformers.utils.logging.disable_progress_bar()
    with _quiet():
        model = cls.from_pretrained(str(root), local_files_only=True, dtype=getattr(torch, DTYPES[dtype]))
    model = model.to(device).eval()
    model.config.use_cache = False
    params = inspect.signature(model.forward).parameters
    inputs = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(config, "type_vocab_size", 0):
        inputs.append("token_type_ids")
    vocab = int(getattr(config, "vocab_size", None) or model.get_input_embeddings().num_embeddings)
    probe = {n: torch.ones((1, 2), dtype=torch.int64, device=device) for n in inputs}
    with torch.no_grad():
        out = model(**probe, use_cache=False) if "use_cache" in params else model(**probe)
    output = "logits" if getattr(out, "logits", None) is not None else "last_hidden_state"
    return LoadedModel(model, inputs, output, task_of(model, output), vocab, _aliases(model))


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {names[0]: names for names in groups.values()}


@contextlib.contextmanager
def _quiet():  # noqa: ANN202
    """Silence the exporter's progress prints and warnings (they go to stdout, which --json owns)."""
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _wrapper(loaded: LoadedModel) -> torch.nn.Module:
    import torch

    model, output = loaded.model, loaded.output
    kwargs = {"use_cache": False} if "use_cache" in __import__("inspect").signature(model.forward).parameters else {}

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs), output)

    class ThreeInputs(TwoInputs):
        def forward(  # type: ignore[override]
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return getattr(out, output)

    return ThreeInputs() if "token_type_ids" in loaded.inputs else TwoInputs()


def trace_to_onnx(loaded: LoadedModel, out_file: Path, opset: int | None = None) -> None:
    """torch.onnx dynamo export with names kept (optimize=False), dynamic batch and sequence."""
    import torch

    device = next(loaded.model.parameters()).device
    sample = {n: torch.ones((2, 8), dtype=torch.int64, device=device) for n in loaded.inputs}
    sample["input_ids"] = torch.arange(16, device=device).reshape(2, 8) % loaded.vocab_size
    dynamic = {n: {0: "batch", 1: "sequence"} for n in loaded.inputs}
    kw: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    with _quiet():
        program = torch.onnx.export(
            _wrapper(loaded), tuple(sample[n] for n in loaded.inputs), dynamo=True, optimize=False,
            input_names=loaded.inputs, output_names=[loaded.output], dynamic_shapes=dynamic, verbose=False, **kw,
        )  # fmt: skip
        program.save(str(out_file), external_data=True)


def rename_initializers(proto: Any, aliases: dict[str, list[str]], keys: set[str]) -> dict[str, str]:
    """Strip the export wrapper's ``model.`` prefix; tied weights take the name the checkpoint stores."""
    owner = {name: names for names in aliases.values() for name in names}
    mapping = {}
    for t in proto.graph.initializer:
        name = t.name[len("model.") :] if t.name.startswith("model.") else t.name
        names = owner.get(name, [name])
        stored = [n for n in names if n in keys]
        new = stored[0] if stored else name
        if new != t.name:
            mapping[t.name] = new
    if not mapping:
        return mapping
    for t in proto.graph.initializer:
        t.name = mapping.get(t.name, t.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    for value in (*proto.graph.input, *proto.graph.value_info):
        value.name = mapping.get(value.name, value.name)
    return mapping


def verify_export(
    model_dir: Path, loaded: LoadedModel, dtype: str, device: str, feeds: dict[str, Any] | None = None
) -> tuple[float, float]:
    """Run onnxruntime and PyTorch on sample inputs; returns (max diff, tolerance) or raises VerificationError."""
    import numpy as np
    import torch

    sess = session(model_dir, device)
    tdev = next(loaded.model.parameters()).device
    worst, limit = 0.0, 0.0
    for batch in sample_batches(loaded.vocab_size, loaded.inputs):
        got = sess.run([loaded.output], {**batch, **(feeds or {})})[0]
        with torch.no_grad():
            ref = _wrapper(loaded)(*(torch.from_numpy(batch[n]).to(tdev) for n in loaded.inputs))
        ref_np = ref.float().cpu().numpy()
        diff = max_difference(got, ref_np, batch["attention_mask"])
        allowed = tolerance(dtype, float(np.abs(ref_np).max()))
        worst, limit = max(worst, diff), max(limit, allowed)
        if not diff <= allowed:  # also catches NaN
            raise VerificationError(
                f"{model_dir}: onnxruntime differs from PyTorch by {diff:.3g} (allowed {allowed:.3g}) "
                f"on a batch of shape {list(batch['input_ids'].shape)}; nothing was published",
                hint="report the model type; try loratools export-onnx with another --opset, or --dtype fp32",
            )
    return worst, limit


def _merged_source(model: Path, adapters: Sequence[Any], weights: Sequence[float], dtype: str, tmp: Path) -> Path:
    """The streaming merge (loratools.ops.merge) into a temporary folder, in the export dtype."""
    from loratools.ops.merge import merge

    merge(model, list(adapters), tmp / "merged", weights=list(weights), dtype=dtype, allow_alora=True)  # checked
    return tmp / "merged"


def copy_config_files(src: Path, dst: Path) -> list[str]:
    """Config and tokenizer files of a checkpoint folder (no weights, no adapter files)."""
    copied = []
    for f in sorted(src.iterdir()) if src.is_dir() else []:
        if not f.is_file() or f.name.startswith(".") or f.name.startswith("adapter_"):
            continue
        if f.suffix in _WEIGHT_SUFFIXES or f.name.endswith(".index.json"):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def export_onnx(
    model: str | Path,
    output: str | Path,
    *,
    adapters: Sequence[str | Path | Adapter] = (),
    weights: Sequence[float] | None = None,
    opset: int | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    verify: bool = True,
    overwrite: bool = False,
    lora_slots: str | Path | Adapter | None = None,
    trust_tensors: bool = False,
    allow_alora: bool = False,
) -> ExportResult:
    """Export ``model`` (merged with ``adapters`` first, if any) to ``output/model.onnx`` + one data file.

    With ``lora_slots`` (an adapter), every module it targets gets LoRA slot inputs (see
    :mod:`loratools.onnx.slots`). Verification (on by default) compares onnxruntime with PyTorch on
    sample inputs and raises :class:`VerificationError` (nothing published) when they differ.
    An activated LoRA (aLoRA) as an adapter or slot source is refused unless ``allow_alora``.
    """
    from loratools.formats.adapter_io import load_adapter
    from loratools.model.ambiguity import require_unambiguous
    from loratools.onnx.slots import add_slots, slot_tensors
    from loratools.publishing.hub import resolve_path
    from loratools.publishing.publish import atomic_output, describe_input, provenance

    start = time.perf_counter()
    check_optional("--opset", opset, OPSET)
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; expected fp32 or fp16")
    root = resolve_path(model, "base checkpoint")
    check_device(device, verify)
    weights = check_weights(weights, len(adapters))
    from loratools.checkpoint.reader import open_checkpoint

    with open_checkpoint(root) as reader:
        keys = set(reader.keys())
        params_bytes = sum(int(reader.info(k).nbytes) // _element_size(reader.info(k).dtype) for k in keys)
    expected = params_bytes * (2 if dtype == "fp16" else 4)
    if adapters:  # the merged checkpoint lives in a temporary folder next to the output until the end
        expected *= 2
    slot_adapter = None
    if lora_slots is not None:
        slot_adapter = lora_slots if not isinstance(lora_slots, str | Path) else load_adapter(lora_slots, base=root)
        from loratools.model.adapter import require_lora

        require_lora(slot_adapter, "export-onnx --lora-slots")  # LoRA inputs hold A and B only
        slot_tensors(slot_adapter, label=str(lora_slots))  # refuses DoRA, biases, embeddings, conv early
    loaded_adapters = [a if not isinstance(a, str | Path) else load_adapter(a, base=root) for a in adapters]
    for a in [*loaded_adapters, *([slot_adapter] if slot_adapter is not None else [])]:
        require_unambiguous(a, trust_tensors=trust_tensors)
    from loratools.model.alora import refuse_merge

    refuse_merge([*loaded_adapters, *([slot_adapter] if slot_adapter is not None else [])], allow_alora)
    inputs = [root, *(Path(a) for a in adapters if isinstance(a, str | Path)), *(
        [Path(lora_slots)] if isinstance(lora_slots, str | Path) else [])]  # fmt: skip
    with atomic_output(output, overwrite=overwrite, inputs=inputs, expected_bytes=expected) as tmp:
        work = tmp / ".work"
        work.mkdir()
        source = _merged_source(root, loaded_adapters, weights, dtype, work) if adapters else None
        loaded = load_model(source or root, dtype, device)
        merged = [m for a in loaded_adapters for m in a.modules]
        raw = work / "raw.onnx"
        trace_to_onnx(loaded, raw, opset)
        proto = load_graph(raw)
        rename_initializers(proto, loaded.aliases, keys)
        # the model's own parameter names (what the graph's names come from), not the checkpoint's keys: a
        # key the model renames on load must not look dropped
        dropped = dropped_tensors(proto, [n for names in loaded.aliases.values() for n in names], loaded.aliases)
        record_dropped(proto, dropped)  # the proof merge-into-ONNX and --lora-slots skip modules by
        skipped = {}
        if slot_adapter is not None:
            skipped = {m: r for m in slot_adapter.modules if (r := skip_reason(m, set(dropped), ())) is not None}
        slots = (
            add_slots(proto, [m for m in slot_adapter.modules if m not in skipped], str(root)) if slot_adapter else []
        )
        record = provenance(
            "export-onnx",
            {"dtype": dtype, "opset": opset, "weights": weights, "device": device, "lora_slots": bool(slots)},
            {"model": describe_input(root), "adapters": [describe_input(a) for a in inputs[1:]]},
        )
        meta = proto.metadata_props.add()
        meta.key, meta.value = "loratools", json.dumps(record, sort_keys=True, separators=(",", ":"))
        src = InitializerSource(raw)
        data_bytes = write_model(proto, src, tmp / MODEL_FILE)
        src.close()
        shutil.rmtree(work)
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
        if opset is not None and opset_used != opset:  # torch.onnx keeps its own opset when a conversion fails
            raise UnsupportedError(
                f"{root}: torch.onnx wrote opset {opset_used}, not the --opset {opset} asked for; "
                "nothing was published",
                hint=f"leave --opset out (torch.onnx's default) or pick one in {MIN_OPSET}..{MAX_OPSET}",
            )
        result = ExportResult(
            Path(output), loaded.task, loaded.inputs, [loaded.output], dtype, opset_used, 0.0, data_bytes,
            merged=merged, slots=slots, dropped=dropped, skipped=skipped,
        )  # fmt: skip
        if verify:
            result.max_diff, result.atol = verify_export(tmp, loaded, dtype, device)
            if slot_adapter is not None:
                np_dtype = DTYPES[dtype]
                feeds = {
                    k: v for k, v in slot_tensors(slot_adapter, np_dtype).items() if k.rsplit(".lora_", 1)[0] in slots
                }
                merge_in_memory(loaded.model, [slot_adapter], [1.0])
                diff, _ = verify_export(tmp, loaded, dtype, device, feeds)
                result.max_diff = max(result.max_diff, diff)
        copy_config_files(root, tmp)
        manifest = {
            **result.to_dict(),
            "provenance": record,
            "tied": {k: v for k, v in loaded.aliases.items() if len(v) > 1},
        }
        manifest.pop("output")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    result.seconds = time.perf_counter() - start
    return result


def check_device(device: str, verify: bool) -> None:
    """Fail before any work when ``device`` cannot be used (no CUDA in torch, or no CUDA provider to verify)."""
    from loratools.args.devices import torch_device
    from loratools.onnx.runtime import providers_for

    torch_device(device)  # the refusal merge gives too
    if verify:
        providers_for(device)  # a clear error (and the fix) when onnxruntime lacks the CUDA provider


def _element_size(dtype: str) -> int:
    from loratools.files.safetensors_file import DTYPES as ST

    return ST.get(dtype, ("", 4))[1]
