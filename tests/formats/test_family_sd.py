"""LyCORIS families into a diffusers pipeline: a LoHa file equal to a kohya LoRA merges to the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loratools import merge
from loratools.checkpoint.reader import open_checkpoint


def _as_loha(lora_file: Path, out: Path) -> Path:
    """Each LoRA module as LoHa (B·A) ⊙ (1·1ᵀ): the same ΔW, LoHa tensors, kohya names."""
    sd = load_file(str(lora_file))
    names = {k.partition(".")[0] for k in sd}
    loha = {}
    for n in names:
        down, up = sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"]
        a = down.reshape(down.shape[0], -1)
        loha[f"{n}.hada_w1_a"] = up.reshape(up.shape[0], -1).contiguous()
        loha[f"{n}.hada_w1_b"] = a.contiguous()
        loha[f"{n}.hada_w2_a"] = torch.ones(up.shape[0], 1)
        loha[f"{n}.hada_w2_b"] = torch.ones(1, a.shape[1])
        if f"{n}.alpha" in sd:
            loha[f"{n}.alpha"] = sd[f"{n}.alpha"]
    save_file(loha, str(out))
    return out


def test_lycoris_loha_merges_into_a_pipeline_like_its_lora(sd_dir: Path, kohya_uniform: Path, tmp_path: Path):
    loha = _as_loha(kohya_uniform, tmp_path / "loha.safetensors")
    merge(sd_dir, [kohya_uniform], tmp_path / "lora-merged")
    merge(sd_dir, [loha], tmp_path / "loha-merged")
    a, b, base = (
        open_checkpoint(tmp_path / "lora-merged"),
        open_checkpoint(tmp_path / "loha-merged"),
        open_checkpoint(sd_dir),
    )
    changed = 0
    for key in a.keys():
        if not torch.equal(a.get(key), base.get(key)):
            changed += 1
        torch.testing.assert_close(b.get(key), a.get(key), atol=1e-6, rtol=0, msg=key)
    assert changed >= 8
