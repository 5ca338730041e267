"""MXFP4 bases (gpt-oss experts): bit-equal to transformers' own dequantization, merged to 16-bit and requantized.

The checkpoint is a tiny gpt-oss built from its transformers config whose expert tensors are packed by our E2M1
packer; transformers' ``convert_moe_packed_tensors`` and its CPU load of the folder (which dequantizes without
Triton) are the reference for every value we read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moe"))

from moe_support import build_moe, logits, moe_peft, sample_ids  # noqa: E402

from loratools.checkpoint.quant.mxfp4 import dequantize_blocks, quantize_blocks  # noqa: E402
from loratools.checkpoint.reader import open_checkpoint  # noqa: E402
from loratools.ops.merge import merge  # noqa: E402

TOL = 1e-5
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def save_mxfp4(model: torch.nn.Module, out: Path) -> Path:
    """``model`` saved by transformers in bf16, its expert tensors then packed as gpt-oss stores them."""
    from safetensors.torch import load_file, save_file

    model.to(torch.bfloat16).save_pretrained(str(out))
    model.float()
    tensors = {}
    for k, v in load_file(str(out / "model.safetensors")).items():
        if k.endswith(EXPERTS):
            tensors[f"{k}_blocks"], tensors[f"{k}_scales"] = quantize_blocks(v.float())
        else:
            tensors[k] = v
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def mxfp4_case(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(base folder, transformers' dequantized fp32 model, PeftModel on it, adapter folder)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mxfp4")
    base = save_mxfp4(build_moe("gpt_oss", intermediate_size=32), root / "base")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()  # CPU: dequantized
    peft = moe_peft(model, root / "lora")
    return base, model, peft, root / "lora"


def test_dequantize_bit_equal_to_transformers_on_every_code_and_scale() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)  # every code pair
    scales = torch.randint(0, 254, (3, 40, 4), dtype=torch.uint8, generator=g)  # subnormal to huge exponents
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ref = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)
        ours = dequantize_blocks(blocks, scales, dtype)
        assert ours.shape == ref.shape == (3, 128, 40)
        assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8)), dtype  # bits, NaN/Inf included


def test_requantize_round_trips_representable_values() -> None:
    """quantize(deq(q)) dequantizes to the same values (scales kept in a normal fp32 range)."""
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 24, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (2, 24, 2), dtype=torch.uint8, generator=g)
    w = dequantize_blocks(blocks, scales, torch.float32)
    b2, s2 = quantize_blocks(w)
    assert torch.equal(dequantize_blocks(b2, s2, torch.float32), w)


def test_reader_equals_transformers_load(mxfp4_case) -> None:  # noqa: ANN001
    base, model, _, _ = mxfp4_case
    state = model.state_dict()
    with open_checkpoint(base) as r:
        assert r.quant.scheme == "mxfp4" and len(r.quant.tensors) == 4
        assert not any(k.endswith(("_blocks", "_scales")) for k in r.keys())
        for key in r.quant.tensors:
            w = r.get(key)
            assert w.dtype == torch.bfloat16 and tuple(w.shape) == tuple(state[key].shape)
            assert torch.equal(w.float(), state[key]), key


def test_merged_16bit_equals_unmerged_peft_on_dequantized_base(tmp_path: Path, mxfp4_case) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    base, model, peft, adapter = mxfp4_case
    out = tmp_path / "merged"
    summary = merge(base, [adapter], out, dtype="fp32")
    assert summary.quant.scheme == "mxfp4"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = sample_ids()
    ref = logits(peft, ids)
    assert float((ref - logits(model, ids)).abs().max()) > 1000 * TOL  # the adapter matters
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert float((logits(merged, ids) - ref).abs().max()) <= TOL


def test_requantize_keeps_mxfp4_and_reports_rho(tmp_path: Path, mxfp4_case) -> None:  # noqa: ANN001
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base, model, peft, adapter = mxfp4_case
    out = tmp_path / "req"
    summary = merge(base, [adapter], out, requantize=True)
    rows = summary.quant.rows
    assert summary.quant.output == "requantized" and len(rows) == 4
    assert all(0.9 < r.rho <= 1.05 for r in rows), [(r.key, r.rho) for r in rows]
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(base / "model.safetensors"), "pt") as b:
        assert set(f.keys()) == set(b.keys())
        assert torch.equal(f.get_tensor("lm_head.weight"), b.get_tensor("lm_head.weight"))
        key = "model.layers.0.mlp.experts.gate_up_proj_blocks"
        assert f.get_tensor(key).dtype == torch.uint8 and not torch.equal(f.get_tensor(key), b.get_tensor(key))
    # transformers reads the requantized folder as MXFP4 again; it is closer to the PeftModel than the base is
    again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = sample_ids()
    ref = logits(peft, ids)
    assert float((logits(again, ids) - ref).abs().max()) < float((logits(model, ids) - ref).abs().max())
