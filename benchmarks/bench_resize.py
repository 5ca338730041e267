"""Benchmark: resize N modules of D×D from rank R to r, ours vs materializing the dense ΔW.

(ours) QR/Cholesky-QR of the factors + SVD of the R×R core (loratools.model.lowrank), new factors split √σ.
(a)    dense ΔW = s·B·A in fp32, then torch.linalg.svd(full_matrices=False) (what most tools do).
(b)    dense ΔW, then torch.svd_lowrank(q=2r, niter=2) (kohya's resize above 2048 dimensions).

Accuracy is the largest error of the kept σ_1..σ_r against a reference computed independently in
fp64 (Householder QR of both factors + SVD of the core), relative to σ_1. (a) is slow (~10 s per
4096² module), so by default it runs on fewer modules and its total is extrapolated (said in the output).

    python benchmarks/bench_resize.py [--modules 32] [--dim 4096] [--rank 64] [--new-rank 8] [--dense-modules 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from loratools.model.adapter import LoraModule
from loratools.model.lowrank import module_svd, truncate_module


def make_modules(n: int, dim: int, rank: int, seed: int = 0) -> list[LoraModule]:
    g = torch.Generator().manual_seed(seed)
    mods = []
    for i in range(n):
        decay = 0.7 + 0.25 * i / max(n - 1, 1)  # spectra decay at different rates: not all σ equal
        up = torch.randn(dim, rank, generator=g) * decay ** torch.arange(rank, dtype=torch.float32) / dim**0.5
        down = torch.randn(rank, dim, generator=g) / dim**0.5
        mods.append(LoraModule(down=down, up=up, alpha=rank / 2))
    return mods


def reference_sigma(m: LoraModule, k: int) -> torch.Tensor:
    up, down = m.factors(torch.float64)
    _, rb = torch.linalg.qr(up)
    _, ra = torch.linalg.qr(down.T)
    return torch.linalg.svdvals(rb @ ra.T)[:k] * m.scale


def ours(m: LoraModule, k: int) -> tuple[LoraModule, torch.Tensor]:
    svd = module_svd(m)
    return truncate_module(m, svd, k), svd.s[:k]


def dense_full(m: LoraModule, k: int) -> torch.Tensor:
    d = m.delta()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    root = s[:k].sqrt()
    _ = (u[:, :k] * root, root[:, None] * vh[:k])
    return s[:k]


def dense_lowrank(m: LoraModule, k: int) -> torch.Tensor:
    d = m.delta()
    u, s, v = torch.svd_lowrank(d, q=2 * k, niter=2)
    root = s[:k].sqrt()
    _ = (u[:, :k] * root, root[:, None] * v[:, :k].T)
    return s[:k]


def run(fn, mods, k, refs):
    err = 0.0
    start = time.perf_counter()
    for m, ref in zip(mods, refs, strict=True):
        out = fn(m, k)
        s = out[1] if isinstance(out, tuple) else out
        err = max(err, float((s.double() - ref).abs().max() / ref[0]))
    return time.perf_counter() - start, err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", type=int, default=32)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--new-rank", type=int, default=8)
    p.add_argument("--dense-modules", type=int, default=2, help="modules timed for (a); the total is extrapolated")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    mods = make_modules(a.modules, a.dim, a.rank)
    k = a.new_rank
    refs = [reference_sigma(m, k) for m in mods]
    ours(mods[0], k), dense_lowrank(mods[0], k)  # warm-up
    t_ours, e_ours = run(ours, mods, k, refs)
    t_b, e_b = run(dense_lowrank, mods, k, refs)
    nd = min(a.dense_modules, a.modules)
    t_a_part, e_a = run(dense_full, mods[:nd], k, refs[:nd])
    t_a = t_a_part * a.modules / nd
    result = {
        "modules": a.modules,
        "dim": a.dim,
        "rank": a.rank,
        "new_rank": k,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ours_s": t_ours,
        "ours_max_sigma_error": e_ours,
        "dense_svd_s": t_a,
        "dense_svd_measured_modules": nd,
        "dense_svd_max_sigma_error": e_a,
        "svd_lowrank_s": t_b,
        "svd_lowrank_max_sigma_error": e_b,
        "speedup_vs_dense_svd": t_a / t_ours,
        "speedup_vs_svd_lowrank": t_b / t_ours,
    }
    if a.json:
        print(json.dumps(result, indent=2))
        return
    extrapolated = f" (measured on {nd}, extrapolated)" if nd < a.modules else ""
    print(
        f"resize {a.modules} modules {a.dim}x{a.dim} rank {a.rank} -> {k}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'method':<44} {'time (s)':>10} {'max σ error / σ_1':>18}")
    print(f"{'loratools (factor QR + core SVD)':<44} {t_ours:>10.3f} {e_ours:>18.2e}")
    print(f"{'(a) dense ΔW + linalg.svd fp32' + extrapolated:<44} {t_a:>10.2f} {e_a:>18.2e}")
    print(f"{'(b) dense ΔW + svd_lowrank(q=2r, niter=2)':<44} {t_b:>10.3f} {e_b:>18.2e}")
    print(f"speedup: {t_a / t_ours:.0f}x vs (a), {t_b / t_ours:.1f}x vs (b)")


if __name__ == "__main__":
    main()
