"""onnxruntime sessions, execution providers, verification against PyTorch, and latency timing."""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import UnsupportedError, UsageError, require

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
#: verification tolerances (max |onnxruntime - PyTorch|): fp32 absolute, fp16 relative to the output scale
FP32_ATOL = 1e-4
FP16_RTOL = 2e-2


def ort_module():  # noqa: ANN201 - returns the onnxruntime module
    """``onnxruntime`` (telemetry off), or a MissingExtraError naming the ``onnx`` extra."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    return require("onnxruntime", "onnx")


#: onnxruntime's C++ prefix on exception text: ``/src/file.cc:93 ReturnType ns::Function(args) message``
#: the status prefix of its Python exceptions: ``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : ``
_ORT_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"^\S+\.(?:cc|cpp|h):\d+\s+(?:[^()]*\([^()]*\)\s*(?:const\s*)?)?")


def ort_message(exc: BaseException) -> str:
    """onnxruntime's exception text as one line, without its C++ source path and function signature."""
    text = _ORT_STATUS.sub("", " ".join(str(exc).split()))
    return _ORT_SOURCE.sub("", text).strip() or exc.__class__.__name__


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device``; a clear error when the CUDA provider is not installed."""
    if device not in PROVIDERS:
        raise UsageError(f"unknown device {device!r}; expected cpu or cuda")
    ort = ort_module()
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UnsupportedError(
            "onnxruntime has no CUDAExecutionProvider here (installed providers: "
            + ", ".join(ort.get_available_providers())
            + ")",
            hint="pip uninstall onnxruntime && pip install 'loratools[onnx-gpu]' "
            "(never install onnxruntime and onnxruntime-gpu together)",
        )
    return PROVIDERS[device]


def session(
    model: str | Path, device: str = "cpu", threads: int | None = None, optimize: bool = True
) -> onnxruntime.InferenceSession:
    """An InferenceSession for ``model`` (a folder with model.onnx, or the file) on ``device``."""
    from loratools.onnx.store import model_path

    ort = ort_module()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    path = model_path(model)
    providers = providers_for(device)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types, with its C++ source path in the text
        from loratools.errors import FormatError

        raise FormatError(f"{path}: onnxruntime cannot load this model ({ort_message(exc)})", path=path) from None


def input_names(sess: onnxruntime.InferenceSession, model_inputs_only: bool = True) -> list[str]:
    """Model inputs (without the optional LoRA slot inputs, whose names contain ``.lora_``)."""
    names = [i.name for i in sess.get_inputs()]
    return [n for n in names if ".lora_" not in n] if model_inputs_only else names


def sample_batches(
    vocab_size: int, names: list[str], seed: int = 0, shapes: tuple[tuple[int, int], ...] = ((2, 7), (1, 13))
) -> list[dict[str, np.ndarray]]:
    """int64 sample inputs: random ids, a right-padded attention mask in the first batch, token types 0/1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batches = []
    for batch, seq in shapes:
        feed = {"input_ids": rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)}
        mask = np.ones((batch, seq), dtype=np.int64)
        if batch > 1:
            mask[0, seq - 2 :] = 0
        feed["attention_mask"] = mask
        if "token_type_ids" in names:
            types = np.zeros((batch, seq), dtype=np.int64)
            types[:, seq // 2 :] = 1
            feed["token_type_ids"] = types
        batches.append({k: v for k, v in feed.items() if k in names})
    return batches


def max_difference(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray | None = None) -> float:
    """max |actual - expected| over positions the attention mask keeps (padding outputs are arbitrary)."""
    import numpy as np

    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    if mask is not None and diff.ndim >= 2 and mask.shape == diff.shape[:2]:
        diff = diff[mask.astype(bool)]
    return float(diff.max()) if diff.size else 0.0


def tolerance(dtype: str, reference_scale: float) -> float:
    """The allowed max difference: 1e-4 for fp32; 2% of the output's magnitude (at least 2e-2) for fp16."""
    return FP32_ATOL if dtype == "fp32" else FP16_RTOL * max(1.0, reference_scale)


def timed(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.0) -> dict[str, float]:
    """Latency of ``fn()`` in milliseconds: p50, p90, mean and the number of runs (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    runs: list[float] = []
    started = time.perf_counter()
    while len(runs) < repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000)
    runs.sort()
    return {
        "p50_ms": statistics.median(runs),
        "p90_ms": runs[min(len(runs) - 1, int(round(0.9 * (len(runs) - 1))))],
        "mean_ms": statistics.fmean(runs),
        "runs": len(runs),
    }


def run_with_adapter(
    sess: onnxruntime.InferenceSession, feed: Mapping[str, Any], adapter_file: str | Path | None
) -> list[Any]:
    """``sess.run`` with an ``.onnx_adapter`` active (ort.LoraAdapter + RunOptions.add_active_adapter)."""
    ort = ort_module()
    options = ort.RunOptions()
    if adapter_file is not None:
        lora = ort.LoraAdapter()
        try:
            lora.Load(str(adapter_file))
        except Exception as exc:  # onnxruntime's message carries its C++ source path
            from loratools.errors import FormatError

            raise FormatError(f"{adapter_file}: not a readable .onnx_adapter file ({ort_message(exc)})") from None
        options.add_active_adapter(lora)
    return sess.run(None, dict(feed), run_options=options)
