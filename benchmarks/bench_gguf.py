"""Benchmark: GGUF adapter conversion and merge into a ~1 GB GGUF base (F16 and Q8_0).

Reuses bench_merge.py's 1.08 GB bf16 Llama-shaped checkpoint (8 layers) and rank-16 all-linear PEFT adapter
in /tmp/loratools-bench, converts the checkpoint to GGUF F16 and Q8_0 with the ``gguf`` package (names by
``get_tensor_name_map``, Q/K rows permuted as llama.cpp's converter does), then times whole processes
(imports included) with ``/usr/bin/time -v``, alternating: ``loratools convert --to gguf``,
``loratools merge BASE.gguf ADAPTER``, and ``cp`` of the base as the floor. Prints a markdown table of
medians. llama.cpp's own tools (convert_hf_to_gguf.py on a merged checkpoint, llama-export-lora) are not
installed here, so they are not timed.

    python benchmarks/bench_gguf.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import HEADS, ROOT, build_adapter, build_base, config, timed  # noqa: E402

LAYERS = 8


def permute(w, n_head: int):  # noqa: ANN001, ANN201 - LlamaModel.permute's formula (here Q and K have 16 heads)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_gguf(hf: Path, out: Path, outtype: str) -> None:
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    if out.is_file():
        return
    cfg = config(LAYERS)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    w = gguf.GGUFWriter(out, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(2048)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(HEADS)
    w.add_head_count_kv(cfg.get("num_key_value_heads", HEADS))
    w.add_layer_norm_rms_eps(1e-6)
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                t = st.get_tensor(key).to(torch.float32).numpy()
                if key.endswith(("q_proj.weight", "k_proj.weight")):
                    t = permute(t, HEADS)
                name = tmap.get_name(key, try_suffixes=(".weight",))
                if outtype == "q8_0" and t.ndim == 2:
                    q8 = gguf.GGMLQuantizationType.Q8_0
                    w.add_tensor(name, gguf.quants.quantize(t, q8), raw_dtype=q8)
                else:
                    w.add_tensor(name, t.astype(np.float16) if t.ndim == 2 else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    hf, adapter = ROOT / f"base-{LAYERS}", ROOT / f"adapter-{LAYERS}"
    build_base(hf, LAYERS)
    build_adapter(adapter, LAYERS)
    bases = {t: ROOT / f"base-{LAYERS}-{t}.gguf" for t in ("f16", "q8_0")}
    for t, p in bases.items():
        build_gguf(hf, p, t)
    lt = [sys.executable, "-m", "loratools"]
    cases = {}
    for t, base in bases.items():
        size = f"{base.stat().st_size / 1e9:.2f} GB {t.upper()}"
        out = ROOT / f"merged-{t}.gguf"
        merge = [*lt, "merge", str(base), str(adapter), "-o", str(out), "--overwrite"]
        convert = [*lt, "convert", str(adapter), "--to", "gguf", "--base", str(base), "-o", str(ROOT / f"a-{t}.gguf")]
        cases[(size, "loratools merge")] = merge
        cases[(size, "loratools convert --to gguf")] = [*convert, "--overwrite"]
        cases[(size, "cp (floor)")] = ["cp", str(base), str(ROOT / f"copy-{t}.gguf")]
    results: dict = {k: [] for k in cases}
    for _ in range(args.runs):
        for k, cmd in cases.items():
            results[k].append(timed(cmd))
    print("| base | tool | wall time (s) | peak RSS (MB) | runs |")
    print("|---|---|---:|---:|---:|")
    for (size, tool), runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs)
        print(f"| {size} | {tool} | {wall:.2f} | {rss:.0f} | {len(runs)} |")


if __name__ == "__main__":
    main()
