"""Benchmark: loratools' K-quant encoder (``loratools.ops.merge.kquant_encode.quantize``) against libggml's own
``quantize_row_q*_K_ref`` (scalar C, called with ctypes) on the same 3072×3072 float32 tensor (N(0, 0.02), a Flux
block weight's shape and spread), per type: medians of ``--runs`` of wall and CPU time, the bytes compared.

loratools runs with torch and the encoder on 1 thread, then on 2 (``quantize(threads=2)``; ``torch.set_num_threads``
the same); the C reference is single-threaded. ``--baseline SRC`` times another loratools tree (e.g. ``git archive``
of an older commit) in a subprocess with SRC first on PYTHONPATH, on the same data: before/after from one run.

    python benchmarks/bench_kquant.py [--runs 3] [--types Q4_K,Q6_K] [--baseline SRC]

libggml-base comes from the llama.cpp runtime venv, as tests/gguf/test_kquant_encode.py finds it (``.venv-llama``
beside the repository, or ``LORATOOLS_LLAMA_VENV``); without it only loratools' times are printed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("LORATOOLS_LLAMA_VENV", REPO / ".venv-llama"))
TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K")
SIDE = 3072


def values() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(SIDE * SIDE) * 0.02).astype(np.float32)


def libggml() -> ctypes.CDLL | None:
    found = sorted(VENV.glob("lib/python*/site-packages/llama_cpp_py_sync/libggml-base.so*"))
    return ctypes.CDLL(str(found[0])) if found else None


def timed(fn, runs: int) -> tuple[float, float, object]:  # noqa: ANN001 - (median wall s, median CPU s, result)
    walls, cpus, out = [], [], None
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def ggml_fn(lib: ctypes.CDLL, kind: str):  # noqa: ANN201
    from loratools.ops.merge.kquant_encode import BLOCK_BYTES

    fn = getattr(lib, f"quantize_row_{kind[:2].lower()}_K_ref")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None

    def run(x: np.ndarray) -> np.ndarray:
        out = np.empty(x.size // 256 * BLOCK_BYTES[kind], dtype=np.uint8)
        fn(x.ctypes.data, out.ctypes.data, x.size)
        return out

    return run


def loratools_times(types: list[str], runs: int, threads: tuple[int, ...]) -> dict[str, dict[int, list[float]]]:
    """{type: {threads: [wall, cpu]}} for this interpreter's loratools."""
    import torch

    from loratools.ops.merge.kquant_encode import quantize

    x = values()
    res: dict[str, dict[int, list[float]]] = {}
    for kind in types:
        res[kind] = {}
        for n in threads:
            torch.set_num_threads(n)
            wall, cpu, _ = timed(lambda k=kind, n=n: quantize(x, k, threads=n), runs)
            res[kind][n] = [wall, cpu]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--baseline", type=Path, help="another loratools source tree, timed the same way")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # baseline subprocess: JSON out
    args = ap.parse_args()
    types = args.types.split(",")
    if args.inner:
        print(json.dumps(loratools_times(types, args.runs, (1,))))
        return
    import torch

    from loratools.ops.merge.kquant_encode import quantize

    torch.set_num_threads(1)
    x = values()
    lib = libggml()
    base = None
    if args.baseline:
        env = dict(os.environ, PYTHONPATH=str(args.baseline.resolve()))
        cmd = [sys.executable, __file__, "--inner", "--runs", str(args.runs), "--types", args.types]
        base = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    print(f"{SIDE}x{SIDE} float32, medians of {args.runs}, wall s (CPU s)\n")
    head = "| type | libggml C, 1 thread | loratools, 1 thread | loratools / C | loratools, 2 threads |"
    if base:
        head += " before, 1 thread | speed-up |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for kind in types:
        ours = loratools_times([kind], args.runs, (1, 2))[kind]
        torch.set_num_threads(1)
        row = f"| {kind} |"
        if lib is not None:
            c_wall, c_cpu, want = timed(lambda k=kind: ggml_fn(lib, k)(x), args.runs)
            same = np.array_equal(want, quantize(x, kind))
            row += f" {c_wall:.3f} ({c_cpu:.3f}) |"
        else:
            c_cpu, same = float("nan"), None
            row += " – |"
        w1, p1 = ours[1]
        w2, p2 = ours[2]
        row += f" {w1:.3f} ({p1:.3f}) | {p1 / c_cpu:.2f} | {w2:.3f} ({p2:.3f}) |"
        if base:
            bw, bp = base[kind]["1"]
            row += f" {bw:.3f} ({bp:.3f}) | {bp / p1:.2f}× |"
        print(row + ("" if same is None else "" if same else "  BYTES DIFFER"))


if __name__ == "__main__":
    main()
