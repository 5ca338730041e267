"""Benchmark: ONNX latency of base / merged / LoRA-slot models vs PyTorch eager, and merge-into-ONNX vs re-export.

Uses the 1 GB bf16 Llama-shaped checkpoint and rank-16 all-linear adapter of bench_merge.py (built in
/tmp/loratools-bench if missing), exports fp32 for CPU, runs ``loratools.onnx.bench.bench`` and then
interleaved rounds (ONNX: merged / base / slots+adapter; PyTorch: merged / PEFT unmerged), so that load from
other processes on the shared cores hits every variant alike.
Prints the markdown for the ``## onnx`` section of docs/benchmarks.md and writes the raw JSON.

    python benchmarks/bench_onnx.py [--seq 64] [--repeats 15] [--ab-rounds 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import ROOT, build_adapter, build_base  # noqa: E402


def interleaved(runners: dict, rounds: int) -> dict[str, dict[str, float]]:
    """Run every callable once per round, rotating the order; p50 of each and median ratio to the first."""
    names = list(runners)
    for fn in runners.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            runners[n]()
            times[n].append((time.perf_counter() - t0) * 1000)
    ref = names[0]
    key = "ratio_to_" + ref.replace(" ", "_")
    out = {}
    for n in names:
        ratios = [x / y for x, y in zip(times[n], times[ref], strict=True)]
        out[n] = {"p50_ms": statistics.median(times[n]), key: statistics.median(ratios)}
    return out


def onnx_ab(work: Path, seq: int, rounds: int) -> dict:
    import numpy as np

    from loratools.onnx.runtime import run_with_adapter, session

    rng = np.random.default_rng(1)
    feed = {"input_ids": rng.integers(0, 32000, size=(1, seq), dtype=np.int64)}
    feed["attention_mask"] = np.ones_like(feed["input_ids"])
    sessions = {n: session(work / n) for n in ("merged", "base", "slots")}
    return interleaved(
        {
            "merged onnx": lambda: sessions["merged"].run(None, feed),
            "base onnx": lambda: sessions["base"].run(None, feed),
            "slots onnx + adapter": lambda: run_with_adapter(sessions["slots"], feed, work / "adapter.onnx_adapter"),
        },
        rounds,
    )


def torch_ab(base: Path, adapter: Path, seq: int, rounds: int) -> dict:
    import copy

    import torch
    from peft import PeftModel

    from loratools.formats.adapter_io import load_adapter
    from loratools.onnx.export import load_model, merge_in_memory

    merged = load_model(base).model
    unmerged = PeftModel.from_pretrained(copy.deepcopy(merged), str(adapter)).eval()
    merge_in_memory(merged, [load_adapter(adapter, base=base)], [1.0])
    ids = torch.randint(0, 32000, (1, seq))

    def call(net):  # noqa: ANN001, ANN202
        with torch.inference_mode():
            net(input_ids=ids, attention_mask=torch.ones_like(ids))

    return interleaved(
        {"pytorch eager merged": lambda: call(merged), "pytorch eager unmerged (peft)": lambda: call(unmerged)}, rounds
    )


def markdown(res: dict, ab_onnx: dict, ab_torch: dict, seq: int, rounds: int) -> str:
    rows = ["| variant | p50 ms | p90 ms | p50 vs merged ONNX |", "|---|---|---|---|"]
    for r in res["rows"]:
        rows.append(f"| {r['variant']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['vs_merged']:.3f} |")
    ab_rows = ["| variant | p50 ms | median per-round ratio |", "|---|---|---|"]
    for group in (ab_onnx, ab_torch):
        ref = next(iter(group))
        for name, v in group.items():
            ratio = next(x for k, x in v.items() if k.startswith("ratio_to_"))
            ab_rows.append(f"| {name} | {v['p50_ms']:.1f} | {ratio:.3f} (vs {ref}) |")
    return "\n".join(
        [
            f"Batch 1, sequence {seq}, fp32 on CPU (onnxruntime CPUExecutionProvider, PyTorch eager), "
            f"{res['rows'][0]['runs']} timed runs per row after warm-up, one variant after the other "
            "(`loratools bench`):",
            "",
            *rows,
            "",
            f"Interleaved over {rounds} rounds (each round runs every variant once, in rotating order, so load from "
            "other processes hits all of them alike):",
            "",
            *ab_rows,
            "",
            f"Merge into the exported ONNX model: {res['merge_onnx_seconds']:.2f} s the first time in the process, "
            f"then {', '.join(f'{x:.2f}' for x in res['merge_onnx_repeat_seconds'])} s. Re-exporting instead: "
            f"`export-onnx --adapter` (streaming merge + torch.onnx fp32 export + writing) "
            f"{res['reexport_with_adapter_seconds']:.1f} s, "
            f"{res['reexport_with_adapter_seconds'] / res['merge_onnx_seconds']:.1f}x slower; the export of the base "
            f"alone {res['export_seconds']:.1f} s, {res['merge_speedup']:.1f}x slower.",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ab-rounds", type=int, default=20)
    args = ap.parse_args()

    from loratools.onnx.bench import bench

    base, adapter = ROOT / "llama-8l", ROOT / "adapter-8l"
    build_base(base, 8)
    build_adapter(adapter, 8)
    work = ROOT / "onnx-work"
    res = bench(base, adapter, batches=(1,), seqs=(args.seq,), warmup=3, repeats=args.repeats, work_dir=work,
                note=lambda t: print(t, file=sys.stderr, flush=True))  # fmt: skip
    from loratools.onnx.export import export_onnx

    t0 = time.perf_counter()  # what a new adapter costs without merge-into-ONNX: merge + full export
    export_onnx(base, work / "reexport", adapters=[adapter], verify=False, overwrite=True)
    res["reexport_with_adapter_seconds"] = time.perf_counter() - t0
    shutil.rmtree(work / "reexport")
    from loratools.onnx.patch import merge_onnx

    again = []
    for _ in range(3):  # merge-into-ONNX once more, three times: the bench's run was the first in the process
        t0 = time.perf_counter()
        merge_onnx(work / "base", [adapter], work / "merged-again", overwrite=True)
        again.append(time.perf_counter() - t0)
    res["merge_onnx_repeat_seconds"] = again
    shutil.rmtree(work / "merged-again")
    ab_onnx = onnx_ab(work, args.seq, args.ab_rounds)
    ab_torch = torch_ab(base, adapter, args.seq, args.ab_rounds)
    result = {"bench": res, "onnx_interleaved": ab_onnx, "torch_interleaved": ab_torch}
    (ROOT / "onnx-result.json").write_text(json.dumps(result, indent=2))
    print(markdown(res, ab_onnx, ab_torch, args.seq, args.ab_rounds))


if __name__ == "__main__":
    main()
