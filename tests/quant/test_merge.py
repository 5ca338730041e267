"""Merging into quantized bases, against transformers + bitsandbytes + PEFT running the same merge."""

from __future__ import annotations

import json

import pytest
import torch
from quant_support import ALL_LINEAR, models

from loratools.checkpoint.reader import open_checkpoint
from loratools.errors import UnsupportedError, UsageError
from loratools.ops.merge import merge

TOL = 1e-4


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, base_model):  # noqa: ANN001, ANN201
    """A rank-4 all-linear adapter, alpha != r, non-square MLP targets, random (non-zero) B."""
    path = tmp_path_factory.mktemp("ad") / "adapter"
    models.make_peft(base_model, path, target_modules=ALL_LINEAR, r=4, lora_alpha=7)
    return path


@pytest.fixture(scope="session")
def small_adapter(tmp_path_factory, base_model):  # noqa: ANN001, ANN201
    """The same shape of adapter with a tiny update (as a real fine-tune's often is)."""
    peft = models.make_peft(base_model, None, target_modules=ALL_LINEAR, r=4, lora_alpha=7, seed=2)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(1e-4)
    path = tmp_path_factory.mktemp("ads") / "adapter"
    peft.save_pretrained(str(path))
    return path


def _logits(path, adapter=None, dequantize=False):  # noqa: ANN001, ANN202
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    if dequantize:
        model.dequantize()
    if not getattr(model, "is_quantized", False):
        model = model.float()
    model = model.eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return models.outputs(model, models.sample_inputs())


def test_merged_16bit_equals_unmerged_peft_on_dequantized_base(tmp_path, bnb_bases, adapter) -> None:  # noqa: ANN001
    """deq(Wq) + ΔW in fp32 == bitsandbytes' dequantization in transformers + the unmerged PeftModel."""
    out = tmp_path / "merged"
    summary = merge(bnb_bases["nf4-dq"], [adapter], out, dtype="fp32")
    assert summary.quant.scheme == "bnb-4bit" and summary.modules_merged == 14
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    ref = _logits(bnb_bases["nf4-dq"], adapter, dequantize=True)
    plain = _logits(bnb_bases["nf4-dq"], None, dequantize=True)
    assert (ref - plain).abs().max() > 100 * TOL  # the adapter matters
    ours = _logits(out)  # transformers loads it as a plain model
    assert (ours - ref).abs().max() <= TOL


def test_default_output_is_compute_dtype(tmp_path, bnb_bases, adapter) -> None:  # noqa: ANN001
    out = tmp_path / "m"
    merge(bnb_bases["int8"], [adapter], out)
    with open_checkpoint(out) as r, open_checkpoint(bnb_bases["int8"]) as b:
        assert r.quant is None
        key = "model.layers.0.mlp.down_proj.weight"
        assert r.info(key).dtype == "BF16"
        # an untouched 16-bit tensor is copied as it is
        assert torch.equal(r.get("model.norm.weight"), b.get("model.norm.weight"))


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_requantize_equals_peft_bnb_merge(tmp_path, bnb_bases, adapter, kind) -> None:  # noqa: ANN001
    """--requantize writes what PEFT's merge_and_unload on the bitsandbytes model holds (packed codes, scales)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "req"
    summary = merge(bnb_bases[kind], [adapter], out, requantize=True)
    report = summary.quant
    assert report.output == "requantized" and len(report.rows) == 14
    assert all(0.9 < r.rho < 1.1 for r in report.rows)  # a large update survives
    model = AutoModelForCausalLM.from_pretrained(str(bnb_bases[kind]), device_map="cpu")
    with pytest.warns(UserWarning):
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    state = merged.state_dict()
    companion = "absmax" if kind != "int8" else None
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in (r.key for r in report.rows):
            assert torch.equal(f.get_tensor(key), state[key].contiguous()), key
            if companion:
                assert torch.equal(
                    f.get_tensor(f"{key}.{companion}"), merged.get_submodule(key[:-7]).weight.quant_state.absmax
                )
            else:
                scb = key[: -len("weight")] + "SCB"
                assert torch.equal(f.get_tensor(scb), state[scb])
        # untouched tensors byte for byte, the quantization kept
        with safe_open(str(bnb_bases[kind] / "model.safetensors"), "pt") as b:
            assert torch.equal(f.get_tensor("lm_head.weight"), b.get_tensor("lm_head.weight"))
            assert set(f.keys()) == set(b.keys())
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    # and transformers loads the requantized checkpoint with bitsandbytes
    requant = _logits(out)
    assert torch.isfinite(requant).all()


def test_fp8_requantize_matches_transformers_quantizer(tmp_path, fp8_base, adapter) -> None:  # noqa: ANN001
    import types

    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    out = tmp_path / "req"
    merge(fp8_base, [adapter], out, requantize=True)
    op = Fp8Quantize(types.SimpleNamespace(quantization_config=types.SimpleNamespace(scale_fmt=None)))
    op._resolve_block_size = lambda value: (32, 32)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    with safe_open(str(out / "model.safetensors"), "pt") as f, open_checkpoint(fp8_base) as base:
        for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            stem = "base_model.model." + key[: -len(".weight")]
            delta = (lora[f"{stem}.lora_B.weight"] @ lora[f"{stem}.lora_A.weight"]) * (7 / 4)
            ref = op._quantize_one(key, base.quant.get(key, torch.float32) + delta)
            assert torch.equal(f.get_tensor(key).view(torch.uint8), ref[key].view(torch.uint8))
            assert torch.equal(f.get_tensor(key + "_scale_inv"), ref[key + "_scale_inv"])
    assert torch.isfinite(_logits(out)).all()  # transformers dequantizes it on a CPU load


def test_small_update_rounded_away_is_reported(tmp_path, bnb_bases, small_adapter) -> None:  # noqa: ANN001
    summary = merge(bnb_bases["nf4-dq"], [small_adapter], tmp_path / "r", requantize=True)
    report = summary.quant
    assert report.rounded_away and report.warnings
    assert "merge without --requantize" in report.warnings[0]
    worst = report.worst("rho", 1)[0]
    assert worst.rho == min(r.rho for r in report.rows)


def test_reference_gap_and_into_reference(tmp_path, bnb_bases, base16, small_adapter, adapter) -> None:  # noqa: ANN001
    s = merge(bnb_bases["nf4-dq"], [small_adapter], tmp_path / "a", reference=base16, dtype="fp32")
    assert all(r.gap > 1 for r in s.quant.rows)  # quantization error dwarfs a small update
    assert "merge into the quantized base" in s.quant.recommendation
    # the gap is ‖W16 − deq(Wq)‖ / ‖ΔW‖, computed here by hand for one module
    key = "model.layers.0.self_attn.q_proj.weight"
    with open_checkpoint(bnb_bases["nf4-dq"]) as q, open_checkpoint(base16) as b, open_checkpoint(tmp_path / "a") as m:
        delta = m.get(key).float() - q.get(key).float()
        want = (b.get(key).float() - q.get(key).float()).norm() / delta.norm()
    row = next(r for r in s.quant.rows if r.key == key)
    assert row.gap == pytest.approx(float(want), rel=1e-3)
    s2 = merge(bnb_bases["nf4-dq"], [adapter], tmp_path / "b", reference=base16, into="reference")
    assert s2.quant.merged_into == "reference"
    with open_checkpoint(tmp_path / "b") as into, open_checkpoint(tmp_path / "a") as a:
        assert not torch.equal(into.get(key), a.get(key))


def test_refusals(tmp_path, gptq_base, bnb_bases, base16, adapter) -> None:  # noqa: ANN001
    with pytest.raises(UnsupportedError, match="calibration") as exc:
        merge(gptq_base, [adapter], tmp_path / "g", requantize=True)
    assert "without --requantize" in exc.value.hint
    with pytest.raises(UsageError, match="needs --reference"):
        merge(bnb_bases["fp4"], [adapter], tmp_path / "x", into="reference")
    with pytest.raises(UsageError, match="need a quantized base"):
        merge(base16, [adapter], tmp_path / "y", requantize=True)
    with pytest.raises(UsageError, match="max-shard-size"):
        merge(bnb_bases["fp4"], [adapter], tmp_path / "z", requantize=True, max_shard_size="1MB")
    # GPTQ merges to 16-bit: deq(Wq) + ΔW
    summary = merge(gptq_base, [adapter], tmp_path / "g16")
    assert summary.quant.scheme == "gptq" and summary.modules_merged == 14


def test_sharded_base_requantized_in_place(tmp_path, bnb_bases, adapter) -> None:  # noqa: ANN001
    """A module's quantized parts may sit in any shard; the index lists them, the reader hides them."""
    import shutil

    from safetensors.torch import load_file

    from loratools.checkpoint.writer import SafetensorsWriter, TensorEntry, plan_shards, write_index
    from loratools.files.safetensors_file import dtype_name

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(bnb_bases["nf4-dq"] / "config.json", sharded / "config.json")
    tensors = load_file(str(bnb_bases["nf4-dq"] / "model.safetensors"))
    # safetensors' own order (wider dtypes first, then by name), cut so a module's parts land in different shards
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries = [TensorEntry(k, dtype_name(tensors[k].dtype), tuple(tensors[k].shape)) for k in names]
    plan = plan_shards(entries, 20_000)
    for fname, group in plan.files.items():
        with SafetensorsWriter(sharded / fname, group, {"format": "pt"}) as w:
            for e in group:
                w.write(e.name, tensors[e.name])
    write_index(sharded / "model.safetensors.index.json", plan)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with open_checkpoint(sharded) as r, open_checkpoint(bnb_bases["nf4-dq"]) as one:
        assert sorted(r.keys()) == sorted(one.keys())
        key = "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(r.get(key), one.get(key))
    out = tmp_path / "req"
    merge(sharded, [adapter], out, requantize=True)
    got = json.loads((out / "model.safetensors.index.json").read_text())
    assert got["weight_map"] == index["weight_map"]
    with open_checkpoint(out) as r, open_checkpoint(sharded) as b:
        assert r.quant is not None and sorted(r.keys()) == sorted(b.keys())
        assert not torch.equal(r.get(key), b.get(key))  # merged
        assert torch.equal(r.get("model.norm.weight"), b.get("model.norm.weight"))


def test_fp8_merged_equals_transformers_dequantized_peft(tmp_path, fp8_base, adapter) -> None:  # noqa: ANN001
    """transformers dequantizes the FP8 base on a CPU load; + the unmerged PeftModel == our fp32 merge."""
    out = tmp_path / "m"
    merge(fp8_base, [adapter], out, dtype="fp32")
    ref = _logits(fp8_base, adapter)
    assert (ref - _logits(fp8_base)).abs().max() > 100 * TOL
    assert (_logits(out) - ref).abs().max() <= TOL
