"""Benchmark: a kohya LoRA into a full-size SD1.5 single file (original LDM layout): loratools vs sd-scripts.

SD1.5 cannot be downloaded here, so the base is synthetic: every tensor of a real
``v1-5-pruned-emaonly.safetensors`` (UNet, CLIP ViT-L text encoder, VAE: the shapes of diffusers' /
transformers' SD1.5 configs, renamed by sd-scripts' own conversion, ``tests/sd/kohya_oracle.py``) holds
random fp16 values (2.1 GB). The LoRA is what sd-scripts trains by default: rank 32, alpha 16, every
Linear/Conv2d under the UNet's transformer blocks and the text encoder's attention/MLP (fp16 factors).

Each tool runs as a whole process (imports included) under ``/usr/bin/time -v``; with ``--sd-scripts DIR``
(a checkout of kohya-ss/sd-scripts) its real ``networks/merge_lora.py`` runs too (through
``benchmarks/run_sd_scripts_merge.py``, which shims what transformers 5 and the uninstalled optional
modules broke) and the two outputs are compared tensor by tensor in fp16 ulps.

    python benchmarks/bench_sd_single_file.py [--sd-scripts /path/to/sd-scripts] [--runs 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path("/tmp/loratools-bench-sd")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "sd"))


def _models(device: str = "meta"):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # SD1.5's UNet config
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)  # fmt: skip
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                          hidden_act="quick_gelu"))  # fmt: skip
    return {"unet": unet, "text_encoder": te, "vae": vae}


def build(base: Path, lora: Path, rank: int = 32, alpha: float = 16.0) -> None:
    import kohya_oracle as ko
    import torch
    from ldm_support import _text_model_path
    from safetensors.torch import save_file

    parts = _models()
    g = torch.Generator().manual_seed(0)
    sds = {k: {n: t for n, t in m.state_dict().items() if t.is_floating_point()} for k, m in parts.items()}
    layout = {f"model.diffusion_model.{k}": v for k, v in ko.convert_unet_state_dict_to_sd(False, sds["unet"]).items()}
    layout.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in sds["text_encoder"].items()})
    layout.update({f"first_stage_model.{k}": v for k, v in ko.convert_vae_state_dict(sds["vae"]).items()})
    tensors = {k: (torch.randn(tuple(v.shape), generator=g) * 0.05).half() for k, v in layout.items()}
    save_file(tensors, str(base), metadata={"format": "pt"})
    del tensors
    targets = ko.UNET_TARGET_REPLACE_MODULE
    roots = [("lora_unet", parts["unet"], targets, lambda p: p),
             ("lora_te", parts["text_encoder"], ko.TEXT_ENCODER_TARGET_REPLACE_MODULE, _text_model_path)]  # fmt: skip
    sd = {}
    for name, module in ko.name_to_module_map(roots).items():
        w = module.weight
        extra = tuple(w.shape[2:])
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, w.shape[1], *extra, generator=g) * 0.1).half()
        sd[f"{name}.lora_up.weight"] = (
            torch.randn(w.shape[0], rank, *((1, 1) if extra else ()), generator=g) * 0.1
        ).half()
        sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(sd, str(lora), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                        "ss_network_alpha": str(alpha)})  # fmt: skip
    print(f"base {base.stat().st_size / 1e9:.2f} GB, LoRA {len(sd) // 3} modules {lora.stat().st_size / 1e6:.1f} MB")


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in GB of a whole process (bench_merge.timed gives MB)."""
    from bench_merge import timed as timed_mb

    seconds, mb = timed_mb(cmd)
    return seconds, mb * 1024 / 1e6


def compare(ours: Path, theirs: Path) -> str:
    """Tensors that differ, and the largest difference in fp16 ulps (same keys required)."""
    import torch
    from safetensors import safe_open

    worst, differ, n = 0, 0, 0
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        missing = set(a.keys()) ^ set(b.keys())
        for k in a.keys():
            if k in missing:
                continue
            x, y = a.get_tensor(k), b.get_tensor(k)
            n += 1
            if x.dtype != torch.float16 or y.dtype != torch.float16 or x.shape != y.shape:
                differ += int(not torch.equal(x.float(), y.float()))
                continue
            xo, yo = (t.view(torch.int16).int() for t in (x, y))
            xo, yo = (torch.where(t < 0, -(t & 0x7FFF), t) for t in (xo, yo))
            d = int((xo - yo).abs().max())
            worst, differ = max(worst, d), differ + int(d > 0)
    return f"{n} common tensors, {len(missing)} keys in one file only, {differ} differ, max {worst} fp16 ulp"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd-scripts", type=Path, help="a kohya-ss/sd-scripts checkout: also run its merge_lora.py")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    base, lora = ROOT / "sd15-synthetic.safetensors", ROOT / "lora-r32.safetensors"
    if not base.exists() or not lora.exists():
        build(base, lora)
    rows = []
    ours = ROOT / "merged-loratools.safetensors"
    for _ in range(args.runs):
        cmd = [sys.executable, "-m", "loratools", "merge", str(base), str(lora), "-o", str(ours), "--overwrite"]
        rows.append(("loratools merge", *timed(cmd)))
    theirs = ROOT / "merged-sd-scripts.safetensors"
    if args.sd_scripts:
        runner = HERE / "run_sd_scripts_merge.py"
        for _ in range(args.runs):
            cmd = [sys.executable, str(runner), str(args.sd_scripts), "--sd_model", str(base), "--models", str(lora),
                   "--ratios", "1", "--save_to", str(theirs), "--save_precision", "fp16",
                   "--precision", "float"]  # fmt: skip
            rows.append(("sd-scripts merge_lora.py", *timed(cmd)))
    print("| tool | wall s | peak RSS GB |\n|---|---|---|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {rss:.2f} |")
    if args.sd_scripts:
        print(compare(ours, theirs))


if __name__ == "__main__":
    main()
