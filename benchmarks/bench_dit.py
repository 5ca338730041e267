"""Benchmark: a kohya Flux LoRA merged into a Flux-dev-shaped single file: loratools vs sd-scripts vs diffusers.

Flux-dev cannot be downloaded here, so the base is synthetic: Flux-dev's original (BFL) layout at full width
(hidden 3072, MLP 12288, 24 heads of 128, the fused ``img_attn.qkv`` (9216) and ``linear1`` (21504) tensors,
every embedder, guidance_in and the final layer) with fewer blocks than the real 19 double + 38 single
(``--double 4 --single 8`` by default: ~5 GB instead of 23.8 GB, for this machine's disk and RAM), random
bf16 values written one tensor at a time. The second base is the same weights in ComfyUI's "fp8 scaled"
form (``model.diffusion_model.`` prefix, every 2-D block weight float8_e4m3fn + a float32 ``scale_weight``,
the ``scaled_fp8`` marker; ComfyUI's recalculate quantizer, tests/dit/comfy_fp8_support.py). The LoRA is what
sd-scripts' ``networks/lora_flux.py`` trains by default: rank 32, alpha 16, every Linear of every double and
single block (``lora_unet_double_blocks_0_img_attn_qkv`` ...: 13 per block pair kind), bf16 factors.

Each tool runs as a whole process (imports included) under ``/usr/bin/time -v`` (bench_merge.timed), the
tools alternating round by round; medians with min-max are printed as a markdown table with the load average.

- loratools: ``loratools merge BASE LORA -o OUT`` (into the bf16 file and into the fp8-scaled file).
- sd-scripts (``--sd-scripts DIR``, a kohya-ss/sd-scripts checkout): its real ``networks/flux_merge_lora.py
  --precision float --save_precision bf16`` through benchmarks/run_sd_scripts_merge.py's shims; the two bf16
  outputs are compared tensor by tensor (max abs difference and bf16 ulps). It has no fp8-scaled path: it
  adds the delta to the fp8 codes and drops the scale, so it is not run there.
- diffusers: ``FluxTransformer2DModel.from_single_file`` + ``FluxPipeline.lora_state_dict`` /
  ``load_lora_into_transformer`` + ``fuse_lora`` + ``unload_lora`` + ``save_pretrained`` (a diffusers folder).

    python benchmarks/bench_dit.py [--sd-scripts /path/to/sd-scripts] [--runs 3] [--double 4 --single 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import timed  # noqa: E402

ROOT = Path("/tmp/loratools-bench-dit")
HERE = Path(__file__).resolve().parent
D, MLP, HEAD, RANK, ALPHA = 3072, 12288, 128, 32, 16.0
FP8_MAX = 448.0

DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import FluxPipeline, FluxTransformer2DModel
base, config, lora, out = sys.argv[1:5]
t = FluxTransformer2DModel.from_single_file(base, config=config, torch_dtype=torch.bfloat16, local_files_only=True)
sd, alphas = FluxPipeline.lora_state_dict(lora, return_alphas=True)
FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=t)
t.fuse_lora(lora_scale=1.0)
t.unload_lora()
t.save_pretrained(out)
"""


def block_linears(double: int, single: int) -> list[tuple[str, tuple[int, int]]]:
    """(original-layout module, (out, in)) of every Linear inside the blocks: sd-scripts' LoRA targets."""
    out = []
    for i in range(double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            out += [(f"{p}_mod.lin", (6 * D, D)), (f"{p}_attn.qkv", (3 * D, D)), (f"{p}_attn.proj", (D, D)),
                    (f"{p}_mlp.0", (MLP, D)), (f"{p}_mlp.2", (D, MLP))]  # fmt: skip
    for i in range(single):
        p = f"single_blocks.{i}"
        out += [(f"{p}.linear1", (3 * D + MLP, D)), (f"{p}.linear2", (D, D + MLP)), (f"{p}.modulation.lin", (3 * D, D))]
    return out


def shapes(double: int, single: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Flux-dev original-layout file (flux1-dev.safetensors' names), blocks first as there."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, (o, n) in block_linears(double, single):
        out += [(f"{name}.weight", (o, n)), (f"{name}.bias", (o,))]
    norms = [f"double_blocks.{i}.{s}_attn.norm" for i in range(double) for s in ("img", "txt")]
    for norm in norms + [f"single_blocks.{i}.norm" for i in range(single)]:
        out += [(f"{norm}.query_norm.scale", (HEAD,)), (f"{norm}.key_norm.scale", (HEAD,))]
    for emb, n in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        out += [(f"{emb}.in_layer.weight", (D, n)), (f"{emb}.in_layer.bias", (D,))]
        out += [(f"{emb}.out_layer.weight", (D, D)), (f"{emb}.out_layer.bias", (D,))]
    out += [("img_in.weight", (D, 64)), ("img_in.bias", (D,)), ("txt_in.weight", (D, 4096)), ("txt_in.bias", (D,))]
    out += [("final_layer.linear.weight", (64, D)), ("final_layer.linear.bias", (64,))]
    ada = "final_layer.adaLN_modulation.1"
    return out + [(f"{ada}.weight", (2 * D, D)), (f"{ada}.bias", (2 * D,))]


def build_base(path: Path, double: int, single: int) -> None:
    import torch

    from loratools.checkpoint.writer import SafetensorsWriter, TensorEntry

    g = torch.Generator().manual_seed(0)
    entries = [TensorEntry(n, "BF16", s) for n, s in shapes(double, single)]
    with SafetensorsWriter(path, entries, {"format": "pt"}) as w:
        for e in entries:
            w.write(e.name, (torch.randn(e.shape, generator=g) * (0.02 if len(e.shape) == 2 else 0.1)).bfloat16())


def build_fp8(path: Path, base: Path) -> None:
    """ComfyUI's fp8-scaled form of ``base`` (tests/dit/comfy_fp8_support.py's rule, streamed)."""
    import torch
    from safetensors import safe_open

    from loratools.checkpoint.writer import SafetensorsWriter, TensorEntry

    p = "model.diffusion_model."
    with safe_open(str(base), "pt") as f:
        keys = list(f.keys())
        fp8 = {k for k in keys if k.endswith(".weight") and "blocks." in k and len(f.get_slice(k).get_shape()) == 2}
        entries = []
        for k in keys:
            shape = tuple(f.get_slice(k).get_shape())
            entries.append(TensorEntry(p + k, "F8_E4M3" if k in fp8 else "BF16", shape))
            if k in fp8:
                entries.append(TensorEntry(p + k[: -len("weight")] + "scale_weight", "F32", ()))
        entries.append(TensorEntry(p + "scaled_fp8", "F8_E4M3", (0,)))
        with SafetensorsWriter(path, entries, {"format": "pt"}) as w:
            for k in keys:
                t = f.get_tensor(k)
                if k not in fp8:
                    w.write(p + k, t)
                    continue
                t = t.float()
                scale = t.abs().amax() / FP8_MAX
                w.write(p + k, torch.clamp(t * (1.0 / scale), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
                w.write(p + k[: -len("weight")] + "scale_weight", scale.reshape(()))
            w.write(p + "scaled_fp8", torch.empty(0, dtype=torch.float8_e4m3fn))


def build_lora(path: Path, double: int, single: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, (o, n) in block_linears(double, single):
        stem = "lora_unet_" + name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"] = (torch.randn(RANK, n, generator=g) * (1 / n**0.5)).bfloat16()
        sd[f"{stem}.lora_up.weight"] = (torch.randn(o, RANK, generator=g) * 0.01).bfloat16()
        sd[f"{stem}.alpha"] = torch.tensor(ALPHA, dtype=torch.bfloat16)
    meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA),
            "ss_base_model_version": "flux1"}  # fmt: skip
    save_file(sd, str(path), metadata=meta)


def diffusers_config(folder: Path, double: int, single: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": double,
           "num_single_layers": single, "attention_head_dim": HEAD, "num_attention_heads": D // HEAD,
           "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
           "axes_dims_rope": [16, 56, 56]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def compare(ours: Path, theirs: Path) -> str:
    """Tensors that differ, the largest absolute difference and the largest in bf16 ulps (common keys)."""
    import torch
    from safetensors import safe_open

    worst_abs, worst_ulp, differ, n = 0.0, 0, 0, 0
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        only = set(a.keys()) ^ set(b.keys())
        for k in sorted(set(a.keys()) & set(b.keys())):
            x, y = a.get_tensor(k), b.get_tensor(k)
            n += 1
            if x.dtype != y.dtype or x.shape != y.shape:
                differ += 1
                continue
            worst_abs = max(worst_abs, float((x.float() - y.float()).abs().max()))
            if x.dtype == torch.bfloat16:
                xo, yo = (t.view(torch.int16).int() for t in (x, y))
                xo, yo = (torch.where(t < 0, -(t & 0x7FFF), t) for t in (xo, yo))
                d = int((xo - yo).abs().max())
                worst_ulp, differ = max(worst_ulp, d), differ + int(d > 0)
    return (f"{n} common tensors, {len(only)} keys in one file only, {differ} differ, max abs diff {worst_abs:.3g}, "
            f"max {worst_ulp} bf16 ulp")  # fmt: skip


def settle(inputs: list[Path]) -> None:
    """The same start for every tool: nothing left to write from the run before (its output's pages would be
    written back during the next tool's run and slow that one), and the tool's inputs read once (in the page
    cache, as after the previous tool: not evicted by its memory)."""
    os.sync()
    chunk = bytearray(64 << 20)
    for path in inputs:
        with open(path, "rb") as f:
            while f.readinto(chunk):
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd-scripts", type=Path, help="a kohya-ss/sd-scripts checkout: also run flux_merge_lora.py")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--double", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--only", nargs="+", help="run only these tools (names as in the table)")
    args = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    tag = f"{args.double}d{args.single}s"
    base, fp8 = ROOT / f"flux-{tag}-bf16.safetensors", ROOT / f"flux-{tag}-fp8-scaled.safetensors"
    lora = ROOT / f"lora-{tag}.safetensors"
    cfg = ROOT / f"config-{tag}"
    if not base.exists():
        build_base(base, args.double, args.single)
    if not fp8.exists():
        build_fp8(fp8, base)
    if not lora.exists():
        build_lora(lora, args.double, args.single)
    diffusers_config(cfg, args.double, args.single)
    outs = {"bf16": ROOT / "merged-loratools.safetensors", "fp8": ROOT / "merged-loratools-fp8.safetensors",
            "sd": ROOT / "merged-sd-scripts.safetensors", "diffusers": ROOT / "merged-diffusers"}  # fmt: skip
    lt = [sys.executable, "-m", "loratools", "merge"]
    tools: dict[str, tuple[str, list[str], Path]] = {
        "loratools merge": ("bf16", [*lt, str(base), str(lora), "-o", str(outs["bf16"]), "--overwrite"], outs["bf16"]),
    }
    if args.sd_scripts:
        cmd = [sys.executable, str(HERE / "run_sd_scripts_merge.py"), str(args.sd_scripts),
               "networks/flux_merge_lora.py", "--flux_model", str(base), "--models", str(lora), "--ratios", "1",
               "--save_to", str(outs["sd"]),
               "--precision", "float", "--save_precision", "bf16"]  # fmt: skip
        tools["sd-scripts flux_merge_lora.py"] = ("bf16", cmd, outs["sd"])
    if not args.no_diffusers:
        cmd = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(base), str(cfg), str(lora), str(outs["diffusers"])]
        tools["diffusers fuse_lora + save_pretrained"] = ("bf16", cmd, outs["diffusers"])
    cmd = [*lt, str(fp8), str(lora), "-o", str(outs["fp8"]), "--overwrite"]
    tools["loratools merge (fp8-scaled base)"] = ("fp8", cmd, outs["fp8"])
    if args.only:
        tools = {k: v for k, v in tools.items() if k in args.only}
    results: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    flushes: dict[str, list[float]] = {t: [] for t in tools}
    loads = []
    for _ in range(args.runs):
        for name, (kind, cmd, out) in tools.items():
            if out.is_file():  # the disk holds the base, the fp8 base and ~3 outputs of 5 GB, not a temp more
                out.unlink()
            settle([base if kind == "bf16" else fp8, lora])
            loads.append(os.getloadavg()[0])
            results[name].append(timed(cmd))
            t0 = time.perf_counter()
            os.sync()  # untimed: what the tool left in the page cache to write (counted, in its own column)
            flushes[name].append(time.perf_counter() - t0)
            print(f"{name}: {results[name][-1][0]:.1f} s (+{flushes[name][-1]:.1f} s sync), "
                  f"{results[name][-1][1]:.0f} MB", flush=True)  # fmt: skip
            if name.startswith("diffusers"):
                shutil.rmtree(out, ignore_errors=True)
    sizes = {"bf16": base.stat().st_size / 1e9, "fp8": fp8.stat().st_size / 1e9}
    print(f"\n{args.double} double + {args.single} single blocks, full width; load {min(loads):.1f}-{max(loads):.1f}")
    print("\n| base | tool | wall s, median (min–max) | then `sync` s, median | peak RSS MB, median | runs |")
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        kind = tools[name][0]
        walls = [r[0] for r in rs]
        label = f"{sizes[kind]:.2f} GB {'bf16' if kind == 'bf16' else 'fp8-scaled'}"
        rss, flush = statistics.median(r[1] for r in rs), statistics.median(flushes[name])
        print(f"| {label} | {name} | {statistics.median(walls):.1f} ({min(walls):.1f}–{max(walls):.1f}) | "
              f"{flush:.1f} | {rss:.0f} | {len(rs)} |")  # fmt: skip
    if args.sd_scripts and outs["sd"].exists() and outs["bf16"].exists():
        print("\nloratools vs sd-scripts (bf16 outputs):", compare(outs["bf16"], outs["sd"]))


if __name__ == "__main__":
    main()
