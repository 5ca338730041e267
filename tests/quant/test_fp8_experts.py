"""FP8 block-scaled fused experts (3-D ``gate_up_proj`` + ``gate_up_proj_scale_inv``, issue 20 §3) next to the 2-D
block scales: quantized by transformers' own ``Fp8Quantize`` (which names a 3-D tensor's scale ``<param>_scale_inv``),
read bit-equal to its ``Fp8Dequantize``, merged to 16-bit against the unmerged PeftModel, and requantized."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moe"))

from moe_support import build_moe, logits, moe_peft, sample_ids  # noqa: E402

from loratools.checkpoint.reader import open_checkpoint  # noqa: E402
from loratools.ops.merge import merge  # noqa: E402

TOL = 1e-5
BLOCK = [16, 16]


def _op():  # noqa: ANN202
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    qcfg = types.SimpleNamespace(scale_fmt=None, weight_block_size=BLOCK)
    op = Fp8Quantize(types.SimpleNamespace(quantization_config=qcfg))
    op._resolve_block_size = lambda value: tuple(BLOCK)
    return op


@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny gpt-oss whose fused experts and attention projections are FP8 with 16x16 tiles."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("fp8moe") / "base"
    build_moe("gpt_oss", intermediate_size=32).to(torch.bfloat16).save_pretrained(str(out))
    op, tensors = _op(), {}
    for k, v in load_file(str(out / "model.safetensors")).items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj", "q_proj.weight", "o_proj.weight")):
            tensors.update(op._quantize_one(k, v))
        else:
            tensors[k] = v
    assert "model.layers.0.mlp.experts.gate_up_proj_scale_inv" in tensors
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": BLOCK}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _dequantized_model(base: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_config(base))
    with open_checkpoint(base) as r:
        missing, _ = model.load_state_dict({k: r.get(k).float() for k in r.keys()}, strict=False)
    assert not [m for m in missing if "rotary" not in m], missing
    return model.float().eval()


def _config(base: Path):  # noqa: ANN202
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(base))
    cfg.quantization_config = None
    del cfg.quantization_config
    return cfg


def test_fused_scales_read_bit_equal_to_transformers(fp8_moe: Path) -> None:
    from safetensors import safe_open
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    deq = Fp8Dequantize(None)
    with open_checkpoint(fp8_moe) as r, safe_open(str(fp8_moe / "model.safetensors"), "pt") as f:
        fused = [k for k in r.quant.tensors if not k.endswith(".weight")]
        assert len(fused) == 4 and len(r.quant.tensors) == 8
        assert "model.layers.0.mlp.experts.gate_up_proj_scale_inv" not in r.keys()
        for key, t in r.quant.tensors.items():
            ref = deq._dequantize_one(f.get_tensor(key), f.get_tensor(t.parts["scale"]), torch.bfloat16)
            assert torch.equal(r.get(key), ref), key


def test_fused_fp8_merge_16bit_and_requantize(tmp_path: Path, fp8_moe: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = _dequantized_model(fp8_moe)
    peft = moe_peft(model, tmp_path / "lora")
    out = tmp_path / "merged"
    summary = merge(fp8_moe, [tmp_path / "lora"], out, dtype="fp32")
    assert summary.quant.scheme == "fp8"
    ids = sample_ids()
    ref = logits(peft, ids)
    assert float((ref - logits(model, ids)).abs().max()) > 1000 * TOL
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert float((logits(merged, ids) - ref).abs().max()) <= TOL
    req = merge(fp8_moe, [tmp_path / "lora"], tmp_path / "req", requantize=True)
    rows = {r.key: r.rho for r in req.quant.rows}
    assert set(rows) == {k for k in rows if "experts" in k} and len(rows) == 4
    assert all(0.8 < v < 1.2 for v in rows.values()), rows
    with open_checkpoint(tmp_path / "req") as r:
        t = r.quant.tensors["model.layers.0.mlp.experts.gate_up_proj"]
        assert t.settings["block"] == tuple(BLOCK) and t.settings["fp8_dtype"] == "F8_E4M3"
