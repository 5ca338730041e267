"""Benchmark: ONNX latency of base / merged / LoRA-slot models vs PyTorch eager, and merge-into-ONNX vs re-export.

Uses the 1 GB bf16 Llama-shaped checkpoint and rank-16 all-linear adapter of bench_merge.py (built in
/tmp/loratools-bench if missing), exports fp32 for CPU, runs ``loratools.onnx.bench.bench`` and then an
interleaved A/B of base vs merged ONNX (alternating runs, so load from other processes hits both alike).
Prints the markdown for the ``## onnx`` section of docs/benchmarks.md and writes the raw JSON.

    python benchmarks/bench_onnx.py [--seq 64] [--repeats 15] [--ab-rounds 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import ROOT, build_adapter, build_base  # noqa: E402


def interleaved(base_dir: Path, merged_dir: Path, seq: int, rounds: int) -> dict[str, float]:
    """Alternate base and merged runs; medians of each and of the per-round ratio."""
    import numpy as np

    from loratools.onnx.runtime import session

    a, b = session(base_dir), session(merged_dir)
    rng = np.random.default_rng(1)
    feed = {"input_ids": rng.integers(0, 32000, size=(1, seq), dtype=np.int64)}
    feed["attention_mask"] = np.ones_like(feed["input_ids"])
    for s in (a, b):
        s.run(None, feed)
    ta, tb = [], []
    for i in range(rounds):
        order = (a, b) if i % 2 == 0 else (b, a)
        for s in order:
            t0 = time.perf_counter()
            s.run(None, feed)
            (ta if s is a else tb).append((time.perf_counter() - t0) * 1000)
    ratios = [y / x for x, y in zip(ta, tb, strict=True)]
    return {"base_p50_ms": statistics.median(ta), "merged_p50_ms": statistics.median(tb),
            "ratio_median": statistics.median(ratios)}  # fmt: skip


def markdown(res: dict, ab: dict, seq: int) -> str:
    rows = [
        "| variant | p50 ms | p90 ms | p50 vs merged ONNX |",
        "|---|---|---|---|",
    ]
    for r in res["rows"]:
        rows.append(f"| {r['variant']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['vs_merged']:.3f} |")
    return "\n".join(
        [
            f"Batch 1, sequence {seq}, fp32 on CPU (onnxruntime CPUExecutionProvider, PyTorch eager), "
            f"{res['rows'][0]['runs']} timed runs per row after warm-up.",
            "",
            *rows,
            "",
            f"Interleaved A/B over {ab['rounds']} rounds: base ONNX p50 {ab['base_p50_ms']:.1f} ms, merged ONNX "
            f"p50 {ab['merged_p50_ms']:.1f} ms, median per-round ratio merged/base {ab['ratio_median']:.3f}.",
            "",
            f"Re-export (torch.onnx, fp32): {res['export_seconds']:.1f} s; merge into the exported ONNX model: "
            f"{res['merge_onnx_seconds']:.2f} s ({res['merge_speedup']:.0f}x faster).",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ab-rounds", type=int, default=30)
    args = ap.parse_args()

    from loratools.onnx.bench import bench

    base, adapter = ROOT / "llama-8l", ROOT / "adapter-8l"
    build_base(base, 8)
    build_adapter(adapter, 8)
    work = ROOT / "onnx-work"
    res = bench(base, adapter, batches=(1,), seqs=(args.seq,), warmup=3, repeats=args.repeats, work_dir=work,
                note=lambda t: print(t, file=sys.stderr, flush=True))  # fmt: skip
    ab = interleaved(work / "base", work / "merged", args.seq, args.ab_rounds)
    ab["rounds"] = args.ab_rounds
    (ROOT / "onnx-result.json").write_text(json.dumps({"bench": res, "ab": ab}, indent=2))
    print(markdown(res, ab, args.seq))


if __name__ == "__main__":
    main()
