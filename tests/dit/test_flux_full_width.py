"""diffusers' kohya Flux converter runs only at Flux's full width (it splits single_blocks.N.linear1 as
3072/3072/3072/12288): our split of the fused modules against it there, on one block of each kind (issue 21)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from loratools import load_adapter

D, MLP, R = 3072, 12288, 4
FUSED = {"double_blocks_0_img_attn_qkv": (3 * D, D), "double_blocks_0_txt_attn_qkv": (3 * D, D),
         "single_blocks_0_linear1": (3 * D + MLP, D), "double_blocks_0_img_attn_proj": (D, D)}  # fmt: skip


def test_split_equals_diffusers_converter_at_full_width(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, (name, (out, inp)) in enumerate(FUSED.items()):
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(R, inp, generator=g)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, R, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(2 + 3 * i))  # its own alpha per module
    path = tmp_path / "full.safetensors"
    save_file(sd, str(path))
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))  # alpha/rank baked into A and B
    ours = load_adapter(path).modules
    stems = {k.rsplit(".lora_", 1)[0] for k in theirs}
    assert stems == set(ours)
    x = torch.randn(D, 3, generator=g)
    for stem in stems:
        want = theirs[f"{stem}.lora_B.weight"] @ (theirs[f"{stem}.lora_A.weight"] @ x)
        m = ours[stem]
        got = m.scale * (m.up @ (m.down @ x))
        assert torch.allclose(got, want, atol=1e-3, rtol=1e-5), stem
