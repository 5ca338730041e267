"""The gpt-oss fixture adapter merged into the gpt-oss fixture as a GGUF base (tests/moe_gguf.py, the layout of
llama.cpp's conversion/gpt_oss.py), f32 and MXFP4, held to PEFT's own ΔW (issue 20 item 2). Needs neither the
converter nor the runtime (test_runtime_moe_gptoss_deepseek.py checks both where they are set up)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llamacpp_support import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_gguf import GPT_OSS, GPT_OSS_LORA, write_gpt_oss_gguf  # noqa: E402


@pytest.fixture(scope="module")
def deltas() -> dict[str, np.ndarray]:
    """GGUF expert tensor -> PEFT's get_delta_weight in its (E, out, in) layout (gate ::2, up 1::2)."""
    import peft.utils.transformers_weight_conversion as conversion
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None)
        model = AutoModelForCausalLM.from_pretrained(str(GPT_OSS), dtype=torch.float32)
        pm = PeftModel.from_pretrained(model, str(GPT_OSS_LORA))
    out = {}
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            layer = int(name.split("layers.")[1].split(".")[0])
            d = module.get_delta_weight("default").detach().float().numpy().transpose(0, 2, 1)
            if module.parameter_name == "gate_up_proj":
                out[f"blk.{layer}.ffn_gate_exps.weight"], out[f"blk.{layer}.ffn_up_exps.weight"] = d[:, ::2], d[:, 1::2]
            else:
                out[f"blk.{layer}.ffn_down_exps.weight"] = d
    assert len(out) == 6
    return out


@pytest.mark.parametrize("outtype", ["f32", "mxfp4"])
def test_gpt_oss_fixture_merge(tmp_path, deltas, outtype):
    import gguf

    base = write_gpt_oss_gguf(tmp_path / "base.gguf", outtype)
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(["merge", base, GPT_OSS_LORA, "-o", out, "--verify"])
    assert code == 0, err
    before = {t.name: t for t in gguf.GGUFReader(base).tensors}
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, t in before.items():
        if name not in deltas:
            assert np.array_equal(np.array(t.data), np.array(after[name].data)), name
            continue
        old, new, d = t, after[name], deltas[name]
        assert new.tensor_type == old.tensor_type, name  # MXFP4 stays MXFP4
        want = gguf.quants.dequantize(np.array(old.data), old.tensor_type).reshape(d.shape) + d
        if outtype == "f32":
            got = np.array(new.data).reshape(d.shape)
            assert np.abs(got - want).max() < 1e-6, name
        else:  # exactly the package's MXFP4 encoding of deq(base) + ΔW
            assert np.array_equal(np.array(new.data), gguf.quants.quantize(want.astype(np.float32), old.tensor_type))
