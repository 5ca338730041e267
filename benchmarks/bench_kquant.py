"""Benchmark: loratools' K-quant encoder (``loratools.ops.merge.kquant_encode.quantize``) against libggml's own
``quantize_row_q*_K_ref`` (scalar C, called with ctypes) on the same 3072×3072 float32 tensor (N(0, 0.02), a Flux
block weight's shape and spread), per type: medians of ``--runs`` of wall and CPU time, the bytes compared.

loratools runs with torch and the encoder on 1 thread, then on 2 (``quantize(threads=2)``; ``torch.set_num_threads``
the same); the C reference is single-threaded. ``--baseline SRC`` also times the encoder of another loratools tree
(e.g. ``git archive`` of an older commit; its ``loratools/ops/merge/kquant_*.py`` loaded under other module names),
on the same data. Every run times each in turn (C, loratools, 2 threads, baseline), so a shared machine's load
falls on all alike.

    python benchmarks/bench_kquant.py [--runs 3] [--types Q4_K,Q6_K] [--baseline SRC]

libggml-base comes from the llama.cpp runtime venv, as tests/gguf/test_kquant_encode.py finds it (``.venv-llama``
beside the repository, or ``LORATOOLS_LLAMA_VENV``); without it only loratools' times are printed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
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


def load_baseline(src: Path):  # noqa: ANN201 - the baseline tree's kquant_encode module
    """SRC's K-quant modules as ``_kq_base_*`` (their ``loratools.ops.merge.kquant_*`` imports renamed)."""
    import types

    names = sorted(p.stem for p in (src / "loratools/ops/merge").glob("kquant_*.py"))
    mods = {n: types.ModuleType(f"_kq_base_{n}") for n in names}
    sys.modules.update({m.__name__: m for m in mods.values()})
    for n in ["kquant_math", *[n for n in names if n != "kquant_math"]]:  # the shared arithmetic first
        code = (src / "loratools/ops/merge" / f"{n}.py").read_text()
        code = code.replace("loratools.ops.merge.kquant_", "_kq_base_kquant_")
        code = code.replace("from loratools.ops.merge import kquant_low", "import _kq_base_kquant_low as kquant_low")
        exec(compile(code, f"{src}/{n}.py", "exec"), mods[n].__dict__)  # noqa: S102 - a source tree we were given
    return mods["kquant_encode"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--baseline", type=Path, help="another loratools source tree, timed the same way")
    args = ap.parse_args()
    import torch

    from loratools.ops.merge.kquant_encode import quantize

    x = values()
    lib = libggml()
    base = load_baseline(args.baseline) if args.baseline else None
    print(f"{SIDE}x{SIDE} float32, medians of {args.runs}, CPU s (wall s)\n")
    head = "| type | libggml C, 1 thread | loratools, 1 thread | loratools / C | loratools, 2 threads |"
    if base:
        head += " before, 1 thread | speed-up |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))

    def ours(kind: str, n: int):  # noqa: ANN202
        torch.set_num_threads(n)
        return quantize(x, kind, threads=n)

    for kind in args.types.split(","):
        tools = {"one": lambda k=kind: ours(k, 1), "two": lambda k=kind: ours(k, 2)}
        if lib is not None:
            c_fn = ggml_fn(lib, kind)
            tools = {"C": lambda f=c_fn: f(x), **tools}
        if base:
            tools["base"] = lambda k=kind: (torch.set_num_threads(1), base.quantize(x, k))[1]
        times: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
        outs = {}
        for _ in range(args.runs):
            for t, fn in tools.items():
                wall, cpu, outs[t] = timed(fn, 1)
                times[t].append((cpu, wall))
        med = {t: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for t, v in times.items()}
        cell = {t: f"{c:.3f} ({w:.3f})" for t, (c, w) in med.items()}
        same = all(np.array_equal(o, outs["one"]) for o in outs.values())
        c_cpu = med["C"][0] if "C" in med else float("nan")
        row = f"| {kind} | {cell.get('C', '–')} | {cell['one']} | {med['one'][0] / c_cpu:.2f} | {cell['two']} |"
        if base:
            row += f" {cell['base']} | {med['base'][0] / med['one'][0]:.2f}× |"
        print(row + ("" if same else "  BYTES DIFFER"), flush=True)


if __name__ == "__main__":
    main()
