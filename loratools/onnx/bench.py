"""The latency table behind "no added latency": base, merged and slot ONNX vs PyTorch eager.

Rows: base ONNX; merged ONNX (the adapter merged into the exported initializers); LoRA-slots ONNX with
the adapter active (ort.LoraAdapter + RunOptions.add_active_adapter); PyTorch eager with the adapter
merged; PyTorch eager unmerged (PEFT's LoRA layers). p50/p90 over repeated runs after warm-up. The
same run also times a full re-export against merging into the existing ONNX model.
"""

from __future__ import annotations

import gc
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loratools.args.numeric_args import NON_NEGATIVE_INT, POSITIVE_INT, check_number
from loratools.errors import UsageError
from loratools.onnx.runtime import run_with_adapter, session, timed


def _feed(names: list[str], batch: int, seq: int, vocab: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)}
    feed["attention_mask"] = np.ones((batch, seq), dtype=np.int64)
    feed["token_type_ids"] = np.zeros((batch, seq), dtype=np.int64)
    return {k: v for k, v in feed.items() if k in names}


def bench(
    model: str | Path,
    adapter: str | Path | None = None,
    *,
    device: str = "cpu",
    batches: Sequence[int] = (1,),
    seqs: Sequence[int] = (128,),
    warmup: int = 3,
    repeats: int = 20,
    work_dir: str | Path | None = None,
    note: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Latency (ms) of each variant for every (batch, seq); timings of export vs merge-into-ONNX.

    ONNX models are exported into ``work_dir`` (a temporary folder by default, removed afterwards).
    Returns ``{"device", "dtype", "rows": [...], "export_seconds", "merge_onnx_seconds", "merge_speedup"}``.
    """
    if not batches or not seqs:
        raise UsageError("--batch and --seq need at least one value each")
    for name, values in (("--batch", batches), ("--seq", seqs), ("--repeats", [repeats])):
        for v in values:
            check_number(name, v, POSITIVE_INT)
    check_number("--warmup", warmup, NON_NEGATIVE_INT)
    if adapter is not None:  # a bad adapter fails here, not after the first export
        from loratools.formats.adapter_io import load_adapter

        load_adapter(adapter, base=model)
    say = note or (lambda text: None)
    holder = None
    if work_dir is None:
        holder = tempfile.TemporaryDirectory(prefix="loratools-bench-")
        work = Path(holder.name)
    else:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        return _bench(Path(model), adapter, device, batches, seqs, warmup, repeats, work, say)
    finally:
        if holder is not None:
            holder.cleanup()


def _bench(model, adapter, device, batches, seqs, warmup, repeats, work: Path, say) -> dict[str, Any]:  # noqa: ANN001
    from loratools.onnx.export import check_device, export_onnx
    from loratools.onnx.patch import merge_onnx

    check_device(device, verify=True)  # onnxruntime must run on it too
    dtype = "fp16" if device == "cuda" else "fp32"
    result: dict[str, Any] = {"device": device, "dtype": dtype, "rows": [], "model": str(model)}
    say("exporting the base model to ONNX ...")
    t0 = time.perf_counter()
    export_onnx(model, work / "base", dtype=dtype, device=device, verify=False, overwrite=True)
    result["export_seconds"] = time.perf_counter() - t0
    variants: list[tuple[str, Path, Path | None]] = [("base onnx", work / "base", None)]
    if adapter is not None:
        say("merging the adapter into the ONNX model ...")
        t0 = time.perf_counter()
        merge_onnx(work / "base", [adapter], work / "merged", overwrite=True)
        result["merge_onnx_seconds"] = time.perf_counter() - t0
        result["merge_speedup"] = result["export_seconds"] / max(result["merge_onnx_seconds"], 1e-9)
        say("exporting the LoRA-slots graph ...")
        export_onnx(model, work / "slots", dtype=dtype, device=device, verify=False, overwrite=True, lora_slots=adapter)
        from loratools.formats.adapter_io import load_adapter, save_adapter

        slot_file = work / "adapter.onnx_adapter"
        save_adapter(
            load_adapter(adapter, base=model), slot_file, format="onnx-adapter", overwrite=True, model=work / "slots"
        )
        variants += [("merged onnx", work / "merged", None), ("slots onnx + adapter", work / "slots", slot_file)]
    vocab = _vocab(model)
    for name, folder, adapter_file in variants:
        say(f"timing {name} ...")
        sess = session(folder, device)
        names = [i.name for i in sess.get_inputs()]
        for b in batches:
            for s in seqs:
                feed = _feed(names, b, s, vocab)
                stats = timed(lambda f=feed, a=adapter_file, ss=sess: run_with_adapter(ss, f, a), warmup=warmup,
                              repeats=repeats)  # fmt: skip
                result["rows"].append({"variant": name, "batch": b, "seq": s, **stats})
        del sess
        gc.collect()
    result["rows"] += _torch_rows(model, adapter, device, dtype, batches, seqs, warmup, repeats, vocab, work, say)
    _relative(result["rows"])
    return result


def _vocab(model: Path) -> int:
    import json

    cfg = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    return int(cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size") or 100)


def _torch_rows(model, adapter, device, dtype, batches, seqs, warmup, repeats, vocab, work, say) -> list[dict]:  # noqa: ANN001
    import torch

    from loratools.onnx.export import load_model, merge_in_memory

    loaded = load_model(model, dtype, device)
    rows: list[dict[str, Any]] = []

    def run_all(label: str, net: torch.nn.Module) -> None:
        say(f"timing {label} ...")
        for b in batches:
            for s in seqs:
                feed = {k: torch.from_numpy(v).to(device) for k, v in _feed(loaded.inputs, b, s, vocab).items()}

                def call(f: dict = feed) -> None:
                    with torch.inference_mode():
                        net(**f)
                    if device == "cuda":
                        torch.cuda.synchronize()

                rows.append({"variant": label, "batch": b, "seq": s, **timed(call, warmup=warmup, repeats=repeats)})

    if adapter is None:
        run_all("pytorch eager", loaded.model)
        return rows
    from loratools.formats.adapter_io import load_adapter

    adapter_obj = load_adapter(adapter, base=model)
    try:
        import peft  # noqa: F401
    except ImportError:
        say("peft is not installed: skipping the PyTorch eager unmerged row")
    else:
        peft_dir = _peft_copy(adapter, adapter_obj, work)
        from peft import PeftModel

        with warnings.catch_warnings():  # PEFT calls transformers APIs that warn about their own deprecations
            warnings.simplefilter("ignore", FutureWarning)
            unmerged = PeftModel.from_pretrained(loaded.model, str(peft_dir)).eval()
        run_all("pytorch eager unmerged (peft)", unmerged)
        loaded.model = unmerged.unload()  # the plain base model back, LoRA layers removed
    merge_in_memory(loaded.model, [adapter_obj], [1.0])
    run_all("pytorch eager merged", loaded.model)
    return rows


def _peft_copy(adapter: str | Path, adapter_obj: Any, work: Path) -> Path:
    """The adapter as a PEFT folder PeftModel can load (the input itself when it is one)."""
    from loratools.formats.adapter_io import save_adapter

    p = Path(adapter)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return p
    save_adapter(adapter_obj, work / "peft_adapter", format="peft", overwrite=True)
    return work / "peft_adapter"


def _relative(rows: list[dict[str, Any]]) -> None:
    """Add ``vs_merged`` (p50 / merged ONNX p50, or / base ONNX p50 without an adapter) to every row."""
    ref_name = "merged onnx" if any(r["variant"] == "merged onnx" for r in rows) else "base onnx"
    ref = {(r["batch"], r["seq"]): r["p50_ms"] for r in rows if r["variant"] == ref_name}
    for r in rows:
        base = ref.get((r["batch"], r["seq"]))
        r["vs_" + ref_name.split()[0]] = r["p50_ms"] / base if base else None
