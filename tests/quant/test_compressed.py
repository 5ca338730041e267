"""compressed-tensors bases (int pack-quantized group/channel, symmetric and not; NVFP4) against the package itself.

Each checkpoint is made by the package's own lifecycle (``apply_quantization_config``, its ``calculate_qparams``
scales, ``ModelCompressor.compress_model``, ``save_pretrained``, ``update_config``); its decompressors and
transformers' ``CompressedTensorsConfig(dequantize=True)`` CPU load are the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quant_support import models

from loratools.checkpoint.reader import open_checkpoint
from loratools.ops.merge import merge

ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (the test extra)")

TOL = 1e-5
KINDS = {
    "int4-group-asym": dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=16),
    "int8-channel": dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
    "int4-channel-asym": dict(num_bits=4, type="int", symmetric=False, strategy="channel"),
    "int4-group-sym": dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
    "nvfp4": dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16),
}


def ct_save(kind: str, out: Path) -> Path:
    """A tiny bf16 Llama quantized and saved by compressed-tensors' own lifecycle."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    model = models.build_model("llama", hidden_size=64, intermediate_size=96).to(torch.bfloat16)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**KINDS[kind]))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        s = getattr(module, "quantization_scheme", None)
        if s is None:
            continue
        w, args, glob = module.weight.data, s.weights, None
        if hasattr(module, "weight_global_scale"):
            glob = generate_gparam(w.float().amin(), w.float().amax())
            module.weight_global_scale.data.copy_(glob)
        if args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            g = w.unflatten(-1, (-1, args.group_size))
            lo, hi = g.amin(-1), g.amax(-1)
        scale, zp = calculate_qparams(lo, hi, args, global_scale=glob)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(str(out))
    compressor.update_config(str(out))
    return out


@pytest.fixture(scope="module")
def ct_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct")
    return {kind: ct_save(kind, root / kind) for kind in KINDS}


def _decompressor(base: Path):  # noqa: ANN202
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((base / "config.json").read_text())["quantization_config"])
    group = qc.config_groups["group_0"]
    return BaseCompressor.get_value_from_registry(group.format or qc.format), group


def _module_tensors(f, module: str) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k[len(module) + 1 :]: f.get_tensor(k) for k in f.keys() if k.startswith(module + ".")}  # noqa: SIM118


@pytest.mark.parametrize("kind", list(KINDS))
def test_dequantize_bit_equal_to_compressed_tensors(ct_bases, kind) -> None:  # noqa: ANN001
    from safetensors import safe_open

    base = ct_bases[kind]
    comp, group = _decompressor(base)
    with open_checkpoint(base) as r, safe_open(str(base / "model.safetensors"), "pt") as f:
        assert r.quant.scheme == ("nvfp4" if kind == "nvfp4" else "ct-int") and len(r.quant.tensors) == 14
        assert not any(k.endswith(("weight_packed", "weight_scale")) for k in r.keys())
        for key in r.quant.tensors:
            ref = comp.decompress(_module_tensors(f, key.removesuffix(".weight")), group)["weight"]
            ours = r.get(key)
            assert ours.dtype == ref.dtype == torch.bfloat16
            assert torch.equal(ours.view(torch.int16), ref.view(torch.int16)), key


def _load(path: Path, dequantize: bool = False):  # noqa: ANN202
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


@pytest.mark.parametrize("kind", ["int4-group-asym", "nvfp4"])
def test_merged_16bit_equals_unmerged_peft(tmp_path: Path, ct_bases, kind) -> None:  # noqa: ANN001
    from peft import PeftModel

    base = ct_bases[kind]
    model = _load(base, dequantize=True)  # transformers + compressed-tensors decompress on the CPU
    with open_checkpoint(base) as r:
        state = model.state_dict()
        assert all(torch.equal(r.get(k).float(), state[k]) for k in r.quant.tensors)
    adapter = tmp_path / "lora"
    models.make_peft(model, adapter, target_modules=list(models.DEFAULT_TARGETS["llama"]) + ["o_proj"], r=4)
    out = tmp_path / "merged"
    summary = merge(base, [adapter], out, dtype="fp32")
    assert summary.quant.scheme == r.quant.scheme and summary.modules_merged == 10
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    inputs = models.sample_inputs()
    ref = models.outputs(PeftModel.from_pretrained(_load(base, dequantize=True), str(adapter)).eval(), inputs)
    assert float((ref - models.outputs(model, inputs)).abs().max()) > 1000 * TOL  # the adapter matters
    assert float((models.outputs(_load(out), inputs) - ref).abs().max()) <= TOL


@pytest.mark.parametrize("kind", ["int4-group-asym", "int8-channel", "int4-group-sym"])
def test_int_requantize_equals_compressed_tensors_quantizer(kind) -> None:  # noqa: ANN001
    """Our round-to-nearest int quantizer writes what the package's calculate_qparams + compress writes."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from loratools.checkpoint.quant.compressed import quantize_int

    args = QuantizationArgs(**KINDS[kind])
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    if args.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        g = w.unflatten(-1, (-1, args.group_size))
        lo, hi = g.amin(-1), g.amax(-1)
    scale, zp = calculate_qparams(lo, hi, args)
    sd = {"weight": w, "weight_scale": scale.reshape(48, -1), "weight_zero_point": zp.reshape(48, -1)}
    theirs = PackedQuantizationCompressor.compress(sd, QuantizationScheme(targets=["Linear"], weights=args))
    settings = {
        "bits": args.num_bits,
        "strategy": str(getattr(args.strategy, "value", args.strategy)),
        "group_size": args.group_size,
    }
    ours = quantize_int(w, settings, not args.symmetric)
    assert torch.equal(ours["weight"], theirs["weight_packed"])
    assert torch.equal(ours["scale"], theirs["weight_scale"].reshape(ours["scale"].shape))
    if not args.symmetric:
        assert torch.equal(ours["zero_point"], theirs["weight_zero_point"])


@pytest.mark.parametrize("kind", ["int4-group-asym", "nvfp4"])
def test_requantize_keeps_the_format_and_reports_rho(tmp_path: Path, ct_bases, kind) -> None:  # noqa: ANN001
    from safetensors import safe_open

    base = ct_bases[kind]
    adapter = tmp_path / "lora"
    models.make_peft(_load(base, dequantize=True), adapter, target_modules=["q_proj", "down_proj"], r=4)
    out = tmp_path / "req"
    summary = merge(base, [adapter], out, requantize=True)
    rows = summary.quant.rows
    assert summary.quant.output == "requantized" and len(rows) == 4
    assert all(0.5 < r.rho < 1.5 for r in rows), [(r.key, r.rho) for r in rows]
    comp, group = _decompressor(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(base / "model.safetensors"), "pt") as b:
        assert {k: f.get_slice(k).get_dtype() for k in f.keys()} == {k: b.get_slice(k).get_dtype() for k in b.keys()}  # noqa: SIM118
        for key in (r.key for r in rows):  # the package decompresses what we wrote to what we read
            module = key.removesuffix(".weight")
            ref = comp.decompress(_module_tensors(f, module), group)["weight"]
            with open_checkpoint(out) as r:
                assert torch.equal(r.get(key), ref)
    assert torch.isfinite(models.outputs(_load(out, dequantize=True), models.sample_inputs())).all()
