"""Benchmark: an expert LoRA merged into a ~2 GB bf16 Qwen3-MoE-shaped checkpoint, loratools vs PEFT.

Qwen3-MoE-30B-A3B's shapes (hidden 2048, moe_intermediate 768, 32 heads of 128, 4 KV heads) with a 32000-token
vocabulary and the layer count scaled down to ~2 GB: 8 experts x 16 layers and 32 experts x 5 layers (flat memory
as the expert count grows). Two on-disk layouts of the same weights: per expert (``mlp.experts.{e}.gate_proj`` ...,
what transformers 5 ``save_pretrained`` writes for Qwen3-MoE) and fused (``mlp.experts.gate_up_proj`` (E, 2I, H),
``down_proj`` (E, H, I), transformers 5's in-memory layout, as gpt-oss and Llama-4 store theirs). Random weights
written shard by shard (no model is instantiated). The adapter is a PEFT ``target_parameters`` LoRA (r=16) on
both expert parameters of every layer, in PEFT 0.21's file layout.

``mxfp4``: the same weights' shapes as a gpt-oss model (``GptOssForCausalLM``: Qwen3-MoE's sizes above, gpt-oss'
fused ``(E, in, out)`` experts with biases, attention biases and sinks), its experts stored as gpt-oss stores them
(``*_blocks`` E2M1 codes + ``*_scales`` E8M0 per 32, ``quant_method: mxfp4``, packed by loratools' own
``quantize_blocks``, bit-equal to transformers' dequantization), everything else bf16. loratools merges it to
bf16 (streamed) and ``--requantize`` back to MXFP4; PEFT's route is transformers' CPU load with
``Mxfp4Config(dequantize=True)`` (dequantized to bf16 on load) + ``merge_and_unload`` + ``save_pretrained``.

Whole processes are timed (imports included) with ``/usr/bin/time -v`` (bench_merge.py's ``timed``), tools
alternating, and the medians printed as a markdown table. PEFT: ``from_pretrained`` + ``merge_and_unload`` +
``save_pretrained`` (it reads the per-expert layout and fuses it on load).

    python benchmarks/bench_moe.py [--runs 3] [--experts 8 32] [--layouts per-expert fused mxfp4] [--no-peft]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import timed  # noqa: E402

ROOT = Path("/tmp/loratools-bench-moe")
HIDDEN, INTER, HEADS, KV, HEAD_DIM, VOCAB, RANK = 2048, 768, 32, 4, 128, 32000, 16
LAYERS = {8: 16, 32: 5}  # experts -> layers for ~2 GB
SHARD = 500 * 10**6
LAYOUTS = ["per-expert", "fused", "mxfp4"]

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3], max_shard_size="500MB")
"""
#: PEFT on the MXFP4 base: transformers dequantizes it on load (on the CPU it cannot run the MXFP4 kernels)
PEFT_MXFP4_SCRIPT = PEFT_SCRIPT.replace(
    "dtype=torch.bfloat16)",
    "dtype=torch.bfloat16, quantization_config=__import__('transformers').Mxfp4Config(dequantize=True))",
)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def gptoss_config(experts: int, layers: int) -> dict:
    from transformers import GptOssConfig

    cfg = GptOssConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=experts, num_experts_per_tok=min(4, experts),
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM, num_hidden_layers=layers,
        vocab_size=VOCAB, tie_word_embeddings=False,
    ).to_dict()  # fmt: skip
    cfg.update(architectures=["GptOssForCausalLM"], dtype="bfloat16")
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    return cfg


def build_mxfp4_base(path: Path, experts: int) -> None:
    """A gpt-oss-shaped MXFP4 checkpoint: names and shapes from a meta-device model, random weights, each expert
    quantized on its own and written as the next piece of its ``*_blocks`` (``*_scales`` kept until written)."""
    import torch
    from transformers import AutoModelForCausalLM, GptOssConfig

    from loratools.checkpoint.quant.mxfp4 import BLOCK, quantize_blocks
    from loratools.checkpoint.writer import SafetensorsWriter, TensorEntry, plan_shards, write_index

    if (path / "model.safetensors.index.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    cfg = gptoss_config(experts, LAYERS[experts])
    with torch.device("meta"):
        plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
        model = AutoModelForCausalLM.from_config(GptOssConfig(**plain))
    entries, experts_of = [], {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, n_in, rows = t.shape
            entries += [TensorEntry(f"{name}_blocks", "U8", (e, rows, n_in // BLOCK, 16))]
            entries += [TensorEntry(f"{name}_scales", "U8", (e, rows, n_in // BLOCK))]
            experts_of[name] = (n_in, rows)
        else:
            entries.append(TensorEntry(name, "BF16", tuple(t.shape)))
    del model
    g = torch.Generator().manual_seed(experts)
    scales: dict[str, list] = {}
    plan = plan_shards(entries, SHARD)
    for fname, group in plan.files.items():
        with SafetensorsWriter(path / fname, group, {"format": "pt"}) as w:
            for e in group:
                stem = e.name.removesuffix("_blocks").removesuffix("_scales")
                if e.name.endswith("_blocks"):
                    n_in, rows = experts_of[stem]
                    scales[stem] = []
                    for _ in range(e.shape[0]):
                        b, s = quantize_blocks(torch.randn((1, n_in, rows), generator=g) * 0.02)
                        w.write_part(e.name, b)
                        scales[stem].append(s)
                elif e.name.endswith("_scales"):
                    w.write(e.name, torch.cat(scales.pop(stem)))
                else:
                    w.write(e.name, (torch.randn(e.shape, generator=g) * 0.02).to(torch.bfloat16))
    write_index(path / "model.safetensors.index.json", plan)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def config(experts: int, layers: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": HIDDEN,
        "intermediate_size": 6144,
        "moe_intermediate_size": INTER,
        "num_experts": experts,
        "num_experts_per_tok": min(8, experts),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HEAD_DIM,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "hidden_act": "silu",
    }


def shapes(experts: int, layers: int, fused: bool) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    q, kv = HEADS * HEAD_DIM, KV * HEAD_DIM
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (q, HIDDEN)),
            (f"{p}.self_attn.k_proj.weight", (kv, HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (kv, HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, q)),
            (f"{p}.self_attn.q_norm.weight", (HEAD_DIM,)),
            (f"{p}.self_attn.k_norm.weight", (HEAD_DIM,)),
            (f"{p}.mlp.gate.weight", (experts, HIDDEN)),
        ]
        if fused:
            out += [
                (f"{p}.mlp.experts.gate_up_proj", (experts, 2 * INTER, HIDDEN)),
                (f"{p}.mlp.experts.down_proj", (experts, HIDDEN, INTER)),
            ]
        else:
            for e in range(experts):
                out += [
                    (f"{p}.mlp.experts.{e}.gate_proj.weight", (INTER, HIDDEN)),
                    (f"{p}.mlp.experts.{e}.up_proj.weight", (INTER, HIDDEN)),
                    (f"{p}.mlp.experts.{e}.down_proj.weight", (HIDDEN, INTER)),
                ]
        out += [(f"{p}.input_layernorm.weight", (HIDDEN,)), (f"{p}.post_attention_layernorm.weight", (HIDDEN,))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def build_base(path: Path, experts: int, fused: bool) -> None:
    """Random bf16 weights, one tensor at a time into 500 MB shards (the same seed for both layouts)."""
    import torch

    from loratools.checkpoint.writer import SafetensorsWriter, TensorEntry, plan_shards, write_index

    if (path / "model.safetensors.index.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(experts)
    entries = [TensorEntry(n, "BF16", s) for n, s in shapes(experts, LAYERS[experts], fused)]
    plan = plan_shards(entries, SHARD)
    for fname, group in plan.files.items():
        with SafetensorsWriter(path / fname, group, {"format": "pt"}) as w:
            for e in group:
                w.write(e.name, (torch.randn(e.shape, generator=g) * 0.02).to(torch.bfloat16))
    write_index(path / "model.safetensors.index.json", plan)
    (path / "config.json").write_text(json.dumps(config(experts, LAYERS[experts]), indent=2))


def build_adapter(path: Path, experts: int) -> None:
    """PEFT ``target_parameters`` on gate_up_proj (the inner wrapper: registered first) and down_proj."""
    import torch
    from safetensors.torch import save_file

    if (path / "adapter_config.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(LAYERS[experts]):
        p = f"base_model.model.model.layers.{i}.mlp.experts"
        for wrapper, (out, inp) in ((f"{p}.base_layer", (2 * INTER, HIDDEN)), (p, (HIDDEN, INTER))):
            tensors[f"{wrapper}.lora_A.weight"] = torch.randn(experts * RANK, inp, generator=g) * 0.02
            tensors[f"{wrapper}.lora_B.weight"] = torch.randn(out, experts * RANK, generator=g) * 0.02
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "r": RANK,
        "lora_alpha": 32,
        "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32], choices=sorted(LAYERS))
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS, choices=LAYOUTS)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--peft-layouts", nargs="+", default=["per-expert", "mxfp4"], help="layouts PEFT is run on")
    ap.add_argument("--no-requantize", action="store_true", help="no --requantize row for the MXFP4 base")
    args = ap.parse_args()
    rows = []
    for experts in args.experts:
        adapter = ROOT / f"lora-{experts}e"
        build_adapter(adapter, experts)
        for layout in args.layouts:
            mxfp4 = layout == "mxfp4"
            base = ROOT / (f"gptoss-{experts}e-mxfp4" if mxfp4 else f"qwen3moe-{experts}e-{layout}")
            if mxfp4:
                build_mxfp4_base(base, experts)
            else:
                build_base(base, experts, layout == "fused")
            out = ROOT / "out"
            size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
            tools = {
                "loratools merge": [sys.executable, "-m", "loratools", "merge", str(base), str(adapter), "-o", str(out)]
            }
            if mxfp4 and not args.no_requantize:
                tools["loratools merge --requantize"] = [*tools["loratools merge"], "--requantize"]
            if not args.no_peft and layout in args.peft_layouts:
                script = PEFT_MXFP4_SCRIPT if mxfp4 else PEFT_SCRIPT
                tools["PEFT"] = [sys.executable, "-c", script, str(base), str(adapter), str(out)]
            results: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
            for _ in range(args.runs):
                for name, cmd in tools.items():
                    shutil.rmtree(out, ignore_errors=True)
                    results[name].append(timed(cmd))
                    wall, rss = results[name][-1]
                    print(f"{experts} experts {layout}, {name}: {wall:.2f} s, {rss:.0f} MB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            for name, rs in results.items():
                label = f"{size / 1e9:.2f} GB, {experts} experts x {LAYERS[experts]} layers, {layout}"
                walls, rsss = [r[0] for r in rs], [r[1] for r in rs]
                rows.append(
                    (label, name, statistics.median(walls), min(walls), max(walls), statistics.median(rsss), len(rs))
                )
    print("\n| model | tool | wall time (s), median (min–max) | peak RSS (MB) | runs |\n|---|---|---|---|---|")
    for model, name, wall, lo, hi, rss, n in rows:
        print(f"| {model} | {name} | {wall:.2f} ({lo:.2f}–{hi:.2f}) | {rss:.0f} | {n} |")


if __name__ == "__main__":
    main()
