"""Benchmark: loratools merge vs PEFT (load, merge_and_unload, save_pretrained) vs ``cp -r``.

Builds bf16 Llama-shaped checkpoints (hidden 2048, intermediate 5632, 16 heads, vocab 32000; 8 layers
≈ 1 GB and 32 layers ≈ 4 GB, 300 MB shards) and a rank-16 all-linear PEFT adapter in
/tmp/loratools-bench, then times whole processes (imports included) with ``/usr/bin/time -v``,
alternating the tools, and prints a markdown table of medians.

    python benchmarks/bench_merge.py [--runs 3] [--layers 8 32] [--peft-runs-4x 1]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path("/tmp/loratools-bench")
HIDDEN, INTER, HEADS, VOCAB, RANK = 2048, 5632, 16, 32000, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3], max_shard_size="300MB")
"""


def config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "hidden_act": "silu",
    }


def shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"{p}.self_attn.{n}.weight", (HIDDEN, HIDDEN)))
        out += [
            (f"{p}.mlp.gate_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, INTER)),
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def build_base(path: Path, layers: int) -> None:
    import torch

    from loratools.checkpoint.writer import SafetensorsWriter, TensorEntry, plan_shards, write_index

    if (path / "model.safetensors.index.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    entries = [TensorEntry(n, "BF16", s) for n, s in shapes(layers)]
    plan = plan_shards(entries, 300 * 10**6)
    for fname, group in plan.files.items():
        with SafetensorsWriter(path / fname, group, {"format": "pt"}) as w:
            for e in group:
                w.write(e.name, (torch.randn(e.shape) * 0.02).to(torch.bfloat16))
    write_index(path / "model.safetensors.index.json", plan)
    (path / "config.json").write_text(json.dumps(config(layers), indent=2))


def build_adapter(path: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    if (path / "adapter_config.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    tensors = {}
    dims = {"gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
    for i in range(layers):
        for t in TARGETS:
            block = "mlp" if t in dims else "self_attn"
            fin, fout = dims.get(t, (HIDDEN, HIDDEN))
            k = f"base_model.model.model.layers.{i}.{block}.{t}"
            tensors[f"{k}.lora_A.weight"] = torch.randn(RANK, fin) * 0.02
            tensors[f"{k}.lora_B.weight"] = torch.randn(fout, RANK) * 0.02
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": list(TARGETS), "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a whole process, from /usr/bin/time -v."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{r.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return h * 3600 + m * 60 + s, rss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--peft-runs-4x", type=int, default=1, help="PEFT runs on the bigger model (slow, big RSS)")
    args = ap.parse_args()
    rows = []
    for layers in args.layers:
        base, adapter = ROOT / f"llama-{layers}l", ROOT / f"adapter-{layers}l"
        build_base(base, layers)
        build_adapter(adapter, layers)
        out = ROOT / "out"
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        tools = {
            "loratools merge": [sys.executable, "-m", "loratools", "merge", str(base), str(adapter), "-o", str(out)],
            "PEFT": [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)],
            "cp -r": ["cp", "-r", str(base), str(out)],
        }
        results: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
        for i in range(args.runs):
            for name, cmd in tools.items():
                if name == "PEFT" and layers > 8 and i >= args.peft_runs_4x:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                results[name].append(timed(cmd))
                print(
                    f"{layers} layers, {name}: {results[name][-1][0]:.2f} s, {results[name][-1][1]:.0f} MB", flush=True
                )
        shutil.rmtree(out, ignore_errors=True)
        for name, rs in results.items():
            if rs:
                wall = statistics.median(r[0] for r in rs)
                rss = statistics.median(r[1] for r in rs)
                rows.append((f"{size / 1e9:.2f} GB ({layers} layers)", name, wall, rss, len(rs)))
    print("\n| model | tool | wall time (s) | peak RSS (MB) | runs |\n|---|---|---|---|---|")
    for model, name, wall, rss, n in rows:
        print(f"| {model} | {name} | {wall:.2f} | {rss:.0f} | {n} |")


if __name__ == "__main__":
    main()
