"""Benchmark: a kohya Flux LoRA merged into a Flux-dev-shaped GGUF Q8_0 file as ComfyUI-GGUF writes it, beside the
safetensors merge of the same model in bf16 (issue 21 item 3).

The base is full width (3072, heads of 128, MLP 12288) with fewer blocks (``--double``/``--single``, default 1 and
2), written as ComfyUI-GGUF's convert.py + patched llama-quantize would (blocks' 2-D weights Q8_0, the input/output
layers and 1-D tensors unquantized: F16 / F32), one tensor at a time; the bf16 single file holds the same values.
The LoRA: rank 32 on every Linear of the blocks, ‖ΔW‖/‖W‖ ≈ 2 % (W ~ N(0, 0.02)), an alpha per module. Whole
processes are timed with ``/usr/bin/time -v`` (wall, peak RSS), ``cp`` as the floor; then how much of each update
survives Q8_0 requantization per tensor: ρ and ‖(deq(merged) − deq(base)) − ΔW‖ / ‖ΔW‖.

    python benchmarks/bench_gguf_dit.py [--double 1 --single 2] [--runs 3] [--block-type Q4_K]

``--block-type``: the blocks' 2-D weights in another type (Q4_K, Q6_K ...: encoded by loratools' K-quant encoder,
llama.cpp's reference quantizer; rows must be whole 256-value super-blocks, as every Flux block weight's are).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path("/tmp/loratools-bench/gguf-dit")
H, MLP = 3072, 12288


def shapes(n_double: int, n_single: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {
        "img_in.weight": (H, 64), "img_in.bias": (H,), "txt_in.weight": (H, 4096), "txt_in.bias": (H,),
    }  # fmt: skip
    for emb, n_in in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        out |= {f"{emb}.in_layer.weight": (H, n_in), f"{emb}.in_layer.bias": (H,),
                f"{emb}.out_layer.weight": (H, H), f"{emb}.out_layer.bias": (H,)}  # fmt: skip
    for i in range(n_double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            linears = ((f"{p}_mod.lin", (6 * H, H)), (f"{p}_attn.qkv", (3 * H, H)), (f"{p}_attn.proj", (H, H)),
                       (f"{p}_mlp.0", (MLP, H)), (f"{p}_mlp.2", (H, MLP)))  # fmt: skip
            for name, shape in linears:
                out |= {f"{name}.weight": shape, f"{name}.bias": (shape[0],)}
            out |= {f"{p}_attn.norm.query_norm.scale": (128,), f"{p}_attn.norm.key_norm.scale": (128,)}
    for i in range(n_single):
        p = f"single_blocks.{i}"
        for name, shape in ((f"{p}.linear1", (3 * H + MLP, H)), (f"{p}.linear2", (H, H + MLP)),
                            (f"{p}.modulation.lin", (3 * H, H))):  # fmt: skip
            out |= {f"{name}.weight": shape, f"{name}.bias": (shape[0],)}
        out |= {f"{p}.norm.query_norm.scale": (128,), f"{p}.norm.key_norm.scale": (128,)}
    out |= {"final_layer.linear.weight": (64, H), "final_layer.linear.bias": (64,)}
    out |= {"final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,)}
    return out


BLOCK_TYPE = "Q8_0"


def qtype(name: str, shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
        return "F32"
    return BLOCK_TYPE if name.startswith(("double_blocks", "single_blocks")) else "F16"


def encode(values: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    if kind.endswith("_K"):
        from loratools.ops.merge.kquant_encode import quantize

        return quantize(values, kind, threads=os.cpu_count() or 1)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind])


def value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    g = torch.Generator().manual_seed(hash(name) % (1 << 31))
    return (torch.randn(shape, generator=g) * 0.02).numpy()


def build(n_double: int, n_single: int) -> tuple[Path, Path, Path]:
    import gguf
    from safetensors.torch import save_file

    ROOT.mkdir(parents=True, exist_ok=True)
    gg, st, lora = ROOT / f"flux-{n_double}d{n_single}s-{BLOCK_TYPE}.gguf", ROOT / f"flux-{n_double}d{n_single}s.safetensors", ROOT / "lora.safetensors"  # noqa: E501
    table = shapes(n_double, n_single)
    if not gg.exists():
        w = gguf.GGUFWriter(gg, "flux")
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{BLOCK_TYPE}", gguf.LlamaFileType.MOSTLY_Q8_0))
        for name, shape in table.items():
            t = gguf.GGMLQuantizationType[qtype(name, shape)]
            nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, t)))
            w.add_tensor_info(name, gguf.quants.quant_shape_to_byte_shape(shape, t), np.dtype(np.uint8), nbytes, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, shape in table.items():
            w.write_tensor_data(encode(value(name, shape), qtype(name, shape)))
        w.close()
    if not st.exists():
        save_file({k: torch.from_numpy(value(k, s)).bfloat16() for k, s in table.items()}, str(st))
    if not lora.exists():
        g, out = torch.Generator().manual_seed(7), {}
        linears = [k[: -len(".weight")] for k, s in table.items() if k.endswith(".weight") and "blocks" in k]
        linears = [m for m in linears if len(table[f"{m}.weight"]) == 2]
        for i, m in enumerate(linears):
            o, n = table[f"{m}.weight"]
            stem = "lora_unet_" + m.replace(".", "_")
            out[f"{stem}.lora_down.weight"] = (torch.randn(32, n, generator=g) * 0.01).bfloat16()
            out[f"{stem}.lora_up.weight"] = (torch.randn(o, 32, generator=g) * 0.00707).bfloat16()
            out[f"{stem}.alpha"] = torch.tensor(32.0 if i % 3 else 16.0)
        save_file(out, str(lora))
    return gg, st, lora


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one process."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    return h * 3600 + m * 60 + s, int(rss.group(1)) / 1024


def survival(base: Path, merged: Path, lora: Path) -> dict[str, tuple[float, float]]:
    """Per tensor (ρ = ⟨Q(W+ΔW) − Q(W), ΔW⟩ / ‖ΔW‖², as docs/quantized.md defines it; ‖realized − ΔW‖ / ‖ΔW‖)."""
    from safetensors.torch import load_file

    from loratools.checkpoint.gguf_diffusion import GgufDitBase

    before, after, ad = GgufDitBase(base), GgufDitBase(merged), load_file(str(lora))
    out = {}
    names = ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.2.weight",
             "single_blocks.0.linear1.weight")
    for name in names:
        stem = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
        down, up = ad[f"{stem}.lora_down.weight"].float(), ad[f"{stem}.lora_up.weight"].float()
        delta = float(ad[f"{stem}.alpha"]) / 32 * (up @ down)
        got = after.get(name) - before.get(name)
        rho = float((got * delta).sum() / (delta * delta).sum())
        out[name] = (rho, float((got - delta).norm() / delta.norm()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--block-type", default="Q8_0")
    a = ap.parse_args()
    global BLOCK_TYPE
    BLOCK_TYPE = a.block_type
    q = BLOCK_TYPE
    gg, st, lora = build(a.double, a.single)
    exe = [sys.executable, "-m", "loratools"]
    tools = {
        f"loratools merge {q}.gguf": [*exe, "merge", str(gg), str(lora), "-o", str(ROOT / "out.gguf"), "--overwrite"],
        f"loratools merge {q}.gguf --verify": [*exe, "merge", str(gg), str(lora), "-o", str(ROOT / "out.gguf"),
                                                "--overwrite", "--verify"],  # fmt: skip
        "loratools merge bf16.safetensors": [*exe, "merge", str(st), str(lora), "-o", str(ROOT / "out.safetensors"),
                                             "--overwrite"],  # fmt: skip
        f"cp {q}.gguf": ["cp", str(gg), str(ROOT / "copy.gguf")],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in tools}
    for _ in range(a.runs):
        for k, cmd in tools.items():
            results[k].append(timed(cmd))
    print(f"base {gg.name}: {gg.stat().st_size / 1e9:.2f} GB; bf16 {st.stat().st_size / 1e9:.2f} GB; "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| tool | wall s (median, min-max) | peak RSS MiB |\n|---|---|---|")
    for k, rs in results.items():
        walls = [r[0] for r in rs]
        spread = f"{min(walls):.2f}-{max(walls):.2f}"
        print(f"| {k} | {statistics.median(walls):.2f} ({spread}) | {max(r[1] for r in rs):.0f} |")
    for name, (rho, err) in survival(gg, ROOT / "out.gguf", lora).items():
        print(f"{name}: rho {rho:.3f}, ‖realized − ΔW‖/‖ΔW‖ = {err:.3f}")


if __name__ == "__main__":
    main()
