"""A DeepSeek-V3 adapter (routed experts by target_parameters, shared expert, dense MLP, MLA attention) merged into
a DeepSeek GGUF base written by tests/moe_gguf.write_deepseek_gguf (tensor for tensor what llama.cpp's converter
writes: checked against it once, and by the runtime tests where it is set up), held to PEFT's own ΔW. Needs
neither the converter nor the runtime (issue 20 item 2)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llamacpp_support import run_cli
from test_runtime_moe_gptoss_deepseek import _tensors, peft_deltas

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_gguf import build_deepseek, write_deepseek_gguf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def test_deepseek_merge_is_base_plus_peft_delta(tmp_path, monkeypatch):
    import peft.utils.transformers_weight_conversion as conversion
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, lora = build_deepseek(tmp_path)
    base = write_deepseek_gguf(folder, tmp_path / "base.gguf")
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(["merge", base, lora, "-o", out, "--verify"])
    assert code == 0, err
    monkeypatch.setattr(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    deltas = peft_deltas(
        SimpleNamespace(arch="deepseek", model=model, peft=PeftModel.from_pretrained(model, str(lora)))
    )
    before, after = _tensors(base), _tensors(out)
    assert {"blk.1.attn_k_b.weight", "blk.1.ffn_gate_shexp.weight", "blk.1.ffn_up_exps.weight"} <= set(deltas)
    for name in before:
        if name not in deltas:
            assert np.array_equal(before[name], after[name]), name
        else:
            assert np.abs(after[name] - before[name] - deltas[name]).max() < 1e-6, name
