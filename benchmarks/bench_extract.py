"""Benchmark: peak memory and time of ``loratools extract`` on a Llama-shaped base + fine-tune pair.

Builds, in /tmp/loratools-bench, a bf16 Llama-shaped base (hidden 2048, intermediate 5632, vocab 32000,
untied head; ``--layers`` decoder layers, one safetensors file) and a "fine-tune" of it, tensor by tensor:
every linear projection gets a decaying rank-32 delta plus a noise floor, ``lm_head`` a dense full-rank
change (what a real fine-tune of the head looks like to a low-rank fit), 500 embedding rows change, and
the final norm is scaled. Then it times whole processes (imports included) with ``/usr/bin/time -v``:

- ``extract --rank 16`` of everything (lm_head is saved whole by the default head rule);
- ``extract --rank 16 --include`` of two projections (the floor: imports plus one tensor pair);
- ``python -c 'import torch, loratools'`` (the import floor).

    python benchmarks/bench_extract.py [--layers 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import ROOT, config, shapes, timed  # noqa: E402 - the merge benchmark's model


def _tuned(name: str, w, g):  # noqa: ANN001, ANN202
    import torch

    w = w.float()
    if name.endswith(("norm.weight", "layernorm.weight")):
        return w * 1.05 if name == "model.norm.weight" else w
    if name == "model.embed_tokens.weight":
        rows = torch.randint(0, w.shape[0], (500,), generator=g)
        w[rows] += 0.01 * torch.randn(500, w.shape[1], generator=g)
        return w
    if name == "lm_head.weight":
        return w + 0.01 * torch.randn(w.shape, generator=g)
    r = 32
    s = 0.5 * 0.8 ** torch.arange(r, dtype=torch.float32)
    u = torch.randn(w.shape[0], r, generator=g) / w.shape[0] ** 0.5
    v = torch.randn(r, w.shape[1], generator=g) / w.shape[1] ** 0.5
    return w + (u * s) @ v + 2e-4 * torch.randn(w.shape, generator=g)


def build_pair(layers: int) -> tuple[Path, Path]:
    import torch

    from loratools.checkpoint.writer import SafetensorsWriter, TensorEntry

    base, tuned = ROOT / f"extract-base-{layers}l", ROOT / f"extract-tuned-{layers}l"
    if (tuned / "model.safetensors").is_file():
        return base, tuned
    entries = [TensorEntry(n, "BF16", s) for n, s in shapes(layers)]
    g = torch.Generator().manual_seed(0)
    for d in (base, tuned):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config(layers), indent=2))
    with (
        SafetensorsWriter(base / "model.safetensors", entries, {"format": "pt"}) as wb,
        SafetensorsWriter(tuned / "model.safetensors", entries, {"format": "pt"}) as wt,
    ):
        for e in entries:
            w = (torch.randn(e.shape, generator=g) * 0.02).to(torch.bfloat16)
            if len(e.shape) == 1:
                w = torch.ones(e.shape, dtype=torch.bfloat16)
            wb.write(e.name, w)
            wt.write(e.name, _tuned(e.name, w, g).to(torch.bfloat16))
    return base, tuned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    base, tuned = build_pair(args.layers)
    pair = sum(f.stat().st_size for d in (base, tuned) for f in d.glob("*.safetensors"))
    largest = max(2 * 2 * s[0] * (s[1] if len(s) > 1 else 1) for _, s in shapes(args.layers))
    out = ROOT / "extract-out"
    cli = [sys.executable, "-m", "loratools", "extract", str(base), str(tuned), "--rank", "16"]
    runs = {
        "extract --rank 16 (all tensors)": [*cli, "-o", str(out), "--overwrite"],
        "extract --rank 16 --include 2 projections": [
            *cli,
            "--include",
            r"layers\.0\.self_attn\.(q|v)_proj",
            "-o",
            str(out),
            "--overwrite",
        ],
        "import torch, loratools": [sys.executable, "-c", "import torch, loratools.ops.extract"],
    }
    rows = []
    for name, cmd in runs.items():
        rs = [timed(cmd) for _ in range(args.runs)]
        rows.append((name, statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)))
    shutil.rmtree(out, ignore_errors=True)
    print(f"\nbase + tuned: {pair / 1e9:.2f} GB; largest tensor pair (bf16): {largest / 1e6:.0f} MB\n")
    print("| run | wall time (s) | peak RSS (MB) |\n|---|---|---|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
