"""MLX affine-quantized bases (mlx-lm's own quantize_model + save_model): bit-equal to mx.dequantize / mx.quantize,
merged to 16-bit (equal to the unmerged PeftModel, and loadable by mlx-lm), --requantize with ρ, and mlx-lm's own
``fuse`` measured against it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_support import models

from loratools.checkpoint.quant.mlx import dequantize_affine, quantize_affine
from loratools.checkpoint.reader import open_checkpoint
from loratools.ops.merge import merge

mx = pytest.importorskip("mlx.core", reason="the mlx CPU build is not installable on this platform")
mlx_utils = pytest.importorskip("mlx_lm.utils")
tuner = pytest.importorskip("mlx_lm.tuner.utils")

TOL = 1e-5
IDS = [[1, 5, 9, 33, 60, 2, 17]]
MX_DTYPES = {torch.bfloat16: mx.bfloat16, torch.float16: mx.float16, torch.float32: mx.float32}


def _t(a) -> torch.Tensor:  # noqa: ANN001
    """An mlx array as a torch tensor of the same bits."""
    if a.dtype == mx.uint32:
        return torch.from_numpy(np.array(a).view(np.int32)).view(torch.uint32)
    dt = {mx.bfloat16: torch.bfloat16, mx.float16: torch.float16, mx.float32: torch.float32}[a.dtype]
    return torch.from_numpy(np.array(a.astype(mx.float32))).to(dt)


def mlx_quantized(hf: Path, out: Path, bits: int, group: int) -> Path:
    """An MLX checkpoint of ``hf`` quantized and saved by mlx-lm's own code (its convert, minus the tokenizer)."""
    model, config = mlx_utils.load_model(hf)
    model, config = mlx_utils.quantize_model(model, config, group, bits)
    out.mkdir(parents=True)
    mlx_utils.save_model(out, model)
    mlx_utils.save_config(config, out / "config.json")
    return out


@pytest.fixture(scope="module")
def mlx_case(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(hf base, {kind: mlx quantized folder})."""
    root = tmp_path_factory.mktemp("mlxq")
    hf = models.save_base(models.build_model("llama", hidden_size=64, intermediate_size=96), root / "hf",
                          dtype=torch.bfloat16)  # fmt: skip
    return hf, {f"q{b}g{g}": mlx_quantized(hf, root / f"q{b}g{g}", b, g) for b, g in ((4, 32), (8, 64), (3, 32))}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_dequantize_and_quantize_bit_equal_to_mlx(bits: int) -> None:
    g = np.random.default_rng(bits)
    for group in (32, 64, 128):
        for dt in MX_DTYPES:
            w = mx.array(g.standard_normal((2, 8, 256)).astype(np.float32)).astype(MX_DTYPES[dt])
            q, s, b = mx.quantize(w, group_size=group, bits=bits)
            ref = _t(mx.dequantize(q, s, b, group_size=group, bits=bits))
            assert torch.equal(dequantize_affine(_t(q), _t(s), _t(b), bits), ref), (group, dt)
            q2, s2, b2 = quantize_affine(_t(w), bits, group)
            assert torch.equal(q2.view(torch.int32), _t(q).view(torch.int32)), (group, dt)
            assert torch.equal(s2, _t(s)) and torch.equal(b2, _t(b)), (group, dt)


def test_reader_equals_mlx_dequantize(mlx_case) -> None:  # noqa: ANN001
    _, bases = mlx_case
    for kind, base in bases.items():
        arrays = mx.load(str(base / "model.safetensors"))
        with open_checkpoint(base) as r:
            stored = sum(k.endswith(".scales") for k in arrays)  # mlx-lm skips rows its group does not divide
            assert r.quant.scheme == "mlx-affine" and len(r.quant.tensors) == stored >= 14, kind
            assert not any(k.endswith((".scales", ".biases")) for k in r.keys())
            bits, group = r.quant.tensors["lm_head.weight"].settings.values()
            for key in r.quant.tensors:
                m = key.removesuffix(".weight")
                ref = mx.dequantize(arrays[key], arrays[f"{m}.scales"], arrays[f"{m}.biases"], group_size=group,
                                    bits=bits)  # fmt: skip
                assert torch.equal(r.get(key), _t(ref)), (kind, key)


def _dequantized_torch(base: Path) -> torch.nn.Module:
    """The HF Llama holding deq(Wq) in fp32 (what a user fine-tuned on the MLX base trained against)."""
    model = models.build_model("llama", hidden_size=64, intermediate_size=96)
    with open_checkpoint(base) as r:
        model.load_state_dict({k: r.get(k).float() for k in r.keys()}, strict=False)
    return model.float().eval()


def _adapter(model: torch.nn.Module, path: Path, b_scale: float = 1.0) -> Path:
    pm = models.make_peft(model, None, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    pm.save_pretrained(str(path))
    return pm


def test_merged_16bit_equals_peft_and_loads_in_mlx(tmp_path: Path, mlx_case) -> None:  # noqa: ANN001
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = mlx_case[1]["q4g32"]
    model = _dequantized_torch(base)
    _adapter(model, tmp_path / "lora")
    adapter = tmp_path / "lora"
    out = tmp_path / "merged"
    summary = merge(base, [adapter], out, dtype="fp32")
    assert summary.quant.scheme == "mlx-affine" and summary.modules_merged == 8
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    inputs = models.sample_inputs()
    ref = models.outputs(PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval(), inputs)
    assert float((ref - models.outputs(model, inputs)).abs().max()) > 1000 * TOL  # the adapter matters
    ours = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert float((models.outputs(ours, inputs) - ref).abs().max()) <= TOL
    # and mlx-lm loads the 16-bit output as a plain model with the same logits
    mlx_model, _ = mlx_utils.load_model(out)
    with torch.no_grad():
        torch_ref = ours(input_ids=torch.tensor(IDS)).logits.numpy()
    assert float(np.abs(np.array(mlx_model(mx.array(IDS))) - torch_ref).max()) <= 1e-4


def _rho(back: torch.Tensor, deq: torch.Tensor, delta: torch.Tensor) -> float:
    d = delta.double()
    return float(((back.double() - deq.double()) * d).sum() / (d * d).sum())


@pytest.mark.parametrize("b_scale", [1.0, 0.02, 0.002])
def test_requantize_and_mlx_lm_fuse(tmp_path: Path, mlx_case, b_scale: float) -> None:  # noqa: ANN001
    """--requantize writes mx.quantize of the merged weight; ρ (ours) against ρ of mlx-lm's own fuse, for a
    large update and a small one (B scaled by 0.02, as a short fine-tune's often is)."""
    from loratools.formats.adapter_io import load_adapter, save_adapter

    base = mlx_case[1]["q4g32"]
    model = _dequantized_torch(base)
    pm = _adapter(model, tmp_path / "lora", b_scale)
    adapter = tmp_path / "lora"
    out = tmp_path / "req"
    summary = merge(base, [adapter], out, requantize=True)
    rows = {r.key: r.rho for r in summary.quant.rows}
    assert summary.quant.output == "requantized" and len(rows) == 8
    # mlx-lm's fuse: its LoRA layers on the quantized model, fuse() dequantizes, adds, requantizes
    mlx_ad = tmp_path / "mlx-lora"
    save_adapter(load_adapter(adapter), mlx_ad, format="mlx")
    fm, _ = mlx_utils.load_model(base)
    tuner.load_adapters(fm, str(mlx_ad))
    fm.update_modules(__import__("mlx.utils").utils.tree_unflatten(
        [(n, m.fuse()) for n, m in fm.named_modules() if hasattr(m, "fuse")]))  # fmt: skip
    fused = dict(__import__("mlx.utils").utils.tree_flatten(fm.parameters()))
    peft_delta = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A"):
            peft_delta[f"{name}.weight"] = mod.get_delta_weight("default").float().detach()
    with open_checkpoint(base) as b, open_checkpoint(out) as o:
        theirs = {}
        for key in rows:
            m = key.removesuffix(".weight")
            deq = b.get(key).float()
            back = dequantize_affine(_t(fused[f"{m}.weight"]), _t(fused[f"{m}.scales"]), _t(fused[f"{m}.biases"]), 4)
            theirs[key] = _rho(back.float(), deq, peft_delta[key])
            assert abs(_rho(o.get(key).float(), deq, peft_delta[key]) - rows[key]) < 1e-6
            # ours is mx.quantize of deq(Wq) + ΔW (cast to the base's dtype)
            merged = mx.array((deq + peft_delta[key]).to(torch.bfloat16).float().numpy()).astype(mx.bfloat16)
            q, s, bb = mx.quantize(merged, group_size=32, bits=4)
            assert torch.equal(o.get(key), _t(mx.dequantize(q, s, bb, group_size=32, bits=4))), key
    ours_med, theirs_med = float(np.median(list(rows.values()))), float(np.median(list(theirs.values())))
    print(f"B x {b_scale}: median rho loratools --requantize {ours_med:.4f}, mlx-lm fuse {theirs_med:.4f}")
    assert ours_med > (0.9 if b_scale == 1.0 else 0.0)
