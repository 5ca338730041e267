"""kohya into the tiny SD pipeline: our streaming merge equals diffusers' own load_lora_weights + fuse_lora."""

from __future__ import annotations

from pathlib import Path

import torch
from formats_support import component_weights, fused_weights

from loratools import merge
from loratools.checkpoint.reader import open_checkpoint


def test_kohya_merge_equals_diffusers_fuse(pipe, sd_dir: Path, kohya_uniform: Path, tmp_path: Path) -> None:
    before = component_weights(pipe)
    fused = fused_weights(pipe, kohya_uniform)
    out = tmp_path / "merged"
    merge(sd_dir, [kohya_uniform], out)
    merged = open_checkpoint(out)
    changed = 0
    for key, ref in fused.items():
        if key not in merged:  # buffers diffusers keeps outside the weight files
            continue
        got = merged.get(key)
        if not torch.equal(before[key], ref):
            changed += 1
            assert (ref - before[key]).abs().max() > 1e-3  # the adapter moves this weight far above tolerance
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5, msg=key)
    assert changed >= 8
    # untouched components are copied byte for byte
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (sd_dir / vae).read_bytes()
