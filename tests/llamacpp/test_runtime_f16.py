"""A 16-bit adapter with rsLoRA and rank/alpha patterns (issue 22 §1.6): its scales are folded into B in
fp32 and cast once, so a merge is exact, and without --outtype a B the fold makes inexact in f16 is
written F32 (A stays F16, exact). Measured on the tiny Llama (logits ~15): default 5.2e-4 off the f16
values run in fp32 (the runtime's own rounding of activations for an F16 lora_a), --outtype f16 9.9e-4,
f32 4.8e-6, merged 4.3e-6.
"""

from __future__ import annotations

import torch
from hf_to_gguf import convert
from llamacpp_support import TOL, hf_logits, max_diff, run_cli, run_logits
from test_runtime_adapters import peft_adapter
from tiny_models import build


def test_f16_adapter_folded_scales(runtime, tmp_path):
    import gguf
    from safetensors.torch import load_file, save_file

    folder, model = build("llama", tmp_path / "base")
    base = convert(folder, tmp_path / "base.gguf")
    peft_model = peft_adapter(model, tmp_path / "lora", ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    with torch.no_grad():  # the reference: the f16 values the file holds, run in fp32
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(p.half().float())
    want = hf_logits(peft_model)
    diffs = {}
    for outtype in ("default", "f16", "f32"):
        out = tmp_path / f"{outtype}.gguf"
        extra = [] if outtype == "default" else ["--outtype", outtype]
        code, _, err = run_cli(["convert", tmp_path / "lora", "--to", "gguf", "--base", base, "-o", out, *extra])
        assert code == 0, err
        diffs[outtype] = max_diff(run_logits(base, out).ok(), want)
    types = {t.name.rsplit(".", 1)[-1]: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "default.gguf").tensors}
    assert types == {"lora_a": "F16", "lora_b": "F32"}
    assert diffs["f32"] < TOL and diffs["default"] < 0.75 * diffs["f16"], diffs
    code, _, err = run_cli(["merge", base, tmp_path / "lora", "-o", tmp_path / "m.gguf"])
    assert code == 0, err
    assert max_diff(run_logits(tmp_path / "m.gguf").ok(), want) < TOL
