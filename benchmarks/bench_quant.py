"""Benchmark: merging a rank-16 all-linear adapter into a bitsandbytes nf4 checkpoint on the CPU.

Builds (in /tmp/loratools-bench-quant) the bf16 Llama-shaped checkpoint of ``bench_merge.py`` (8 layers
≈ 1.08 GB in 16-bit, 300 MB shards), quantizes it with transformers + bitsandbytes (nf4, double
quantization, bf16 compute: the usual QLoRA setup) and saves it, then times whole processes (imports
included) with ``/usr/bin/time -v``, alternating the tools:

- ``loratools merge NF4 ADAPTER -o OUT`` (16-bit output: deq(Wq) + ΔW) and with ``--requantize``;
- PEFT's bnb path: ``from_pretrained`` of the nf4 checkpoint, ``PeftModel.from_pretrained``,
  ``merge_and_unload`` (dequantize, add, requantize per layer), then save — nf4 output
  (transformers 5.24's ``save_pretrained`` raises NotImplementedError for a model loaded from a bnb
  checkpoint, so the state dict is written with ``safetensors.torch.save_file`` instead);
- PEFT to 16-bit: the same load, ``model.dequantize()`` first, then merge and save in bf16.

Prints a markdown table of medians, and loratools' per-module report for the same merge with
``--reference`` (the bf16 checkpoint) as a measured example for docs/quantized.md.

    python benchmarks/bench_quant.py [--runs 3] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import build_adapter, build_base, timed  # noqa: E402

ROOT = Path("/tmp/loratools-bench-quant")

QUANTIZE = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg, device_map="cpu", dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2], max_shard_size="300MB")
"""

PEFT_BNB = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
if sys.argv[4] == "16":
    m.dequantize()
m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
try:
    m.save_pretrained(sys.argv[3], max_shard_size="300MB")
except NotImplementedError:  # transformers 5.24 cannot re-save a model loaded from a bnb checkpoint
    import os
    from safetensors.torch import save_file
    os.makedirs(sys.argv[3], exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(sys.argv[3], "model.safetensors"))
    m.config.save_pretrained(sys.argv[3])
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    base16 = ROOT / f"bf16-{args.layers}"
    nf4 = ROOT / f"nf4-{args.layers}"
    adapter = ROOT / f"adapter-{args.layers}"
    build_base(base16, args.layers)
    build_adapter(adapter, args.layers)
    if not (nf4 / "config.json").is_file():
        subprocess.run([sys.executable, "-c", QUANTIZE, str(base16), str(nf4)], check=True)
    py, lt = sys.executable, shutil.which("loratools") or "loratools"
    out = ROOT / "out"
    tools = {
        "loratools merge (16-bit out)": [lt, "merge", str(nf4), str(adapter), "-o", str(out), "--overwrite"],
        "loratools merge --requantize (nf4 out)": [
            lt, "merge", str(nf4), str(adapter), "-o", str(out), "--overwrite", "--requantize",
        ],
        "PEFT bnb merge_and_unload (nf4 out)": [py, "-c", PEFT_BNB, str(nf4), str(adapter), str(out), "4"],
        "PEFT dequantize + merge (bf16 out)": [py, "-c", PEFT_BNB, str(nf4), str(adapter), str(out), "16"],
    }  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in tools}
    for _ in range(args.runs):
        for name, cmd in tools.items():
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(timed(cmd))
    size16 = sum(f.stat().st_size for f in base16.glob("*.safetensors")) / 1e9
    size4 = sum(f.stat().st_size for f in nf4.glob("*.safetensors")) / 1e9
    print(f"\nbase: {size16:.2f} GB bf16, {size4:.2f} GB nf4 ({args.layers} layers); runs: {args.runs}\n")
    print("| tool | wall time (s) | peak RSS (MB) |")
    print("|---|---:|---:|")
    for name, runs in results.items():
        print(f"| {name} | {statistics.median(t for t, _ in runs):.2f} | {statistics.median(m for _, m in runs):.0f} |")
    shutil.rmtree(out, ignore_errors=True)
    report = subprocess.run(
        [lt, "merge", str(nf4), str(adapter), "-o", str(out), "--reference", str(base16), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    q = json.loads(report.stdout)["quantized_base"]
    print(f"\nmedian gap |W16 - deq(Wq)| / |dW|: {q['median_gap']}; recommendation: {q['recommendation']}")
    shutil.rmtree(out, ignore_errors=True)
    req = subprocess.run(
        [lt, "merge", str(nf4), str(adapter), "-o", str(out), "--requantize", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(req.stdout)["quantized_base"]
    rhos = sorted(m["rho"] for m in r["modules"])
    print(f"rho: median {r['median_rho']}, min {rhos[0]:.3f}, max {rhos[-1]:.3f}; warnings: {r['warnings']}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
