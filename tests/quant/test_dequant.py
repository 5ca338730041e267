"""Our dequantization, one tensor at a time from disk, against the quantization libraries' own."""

from __future__ import annotations

import pytest
import torch
from bnb_oracle import NF4, nf4_reference
from quant_support import LINEAR, gptq_reference, load_awq_packer

from loratools.checkpoint.reader import open_checkpoint


def _modules(reader):  # noqa: ANN001, ANN202
    return sorted(k for k in reader.quant.tensors)


#: NF4's largest gap between neighbouring codes is 1 - 0.6962: rounding to the nearest code is off by at most half
NF4_HALF_GAP = max(b - a for a, b in zip(NF4[:-1], NF4[1:], strict=True)) / 2


@pytest.mark.parametrize("shape", [(64, 64), (64, 96), (7, 13)])
def test_bnb_4bit_oracle_round_trip_is_right(shape) -> None:  # noqa: ANN001
    """The oracle itself: bitsandbytes' nf4 round trip equals NF4 by its definition, rows of 96 included.

    bitsandbytes 0.49-0.50's own AVX-512 CPU kernel gets a 64x96 N(0,1) tensor back off by 1.7 (bnb_oracle.py);
    if this fails, every bnb test in this folder compares against wrong numbers.
    """
    import bitsandbytes
    import bitsandbytes.functional as F

    assert torch.equal(F.get_4bit_type("nf4", device="cpu"), torch.tensor(NF4))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    back = F.dequantize_4bit(packed, state)
    reference = nf4_reference(packed, state.absmax, shape, 64)
    err = (back - reference).abs().max().item()
    assert torch.equal(back, reference), f"bitsandbytes {bitsandbytes.__version__} nf4 {shape}: off by {err:.3g}"
    bound = NF4_HALF_GAP * state.absmax.repeat_interleave(64)[: x.numel()].reshape(shape) + 1e-6
    assert ((back - x).abs() <= bound).all()  # the nearest code: each value within half a gap of its block's scale


def test_bnb_linear4bit_forward_is_right() -> None:
    """A Linear4bit of 96 in-features (not a multiple of the block) computes x @ deq(W)^T, one token and three.

    bitsandbytes 0.50's AVX512-BF16 path raises here ("shape '[64, 1]' is invalid for input of size 96").
    """
    import bitsandbytes as bnb

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    kw = dict(quant_type="nf4", compress_statistics=False)
    layer = bnb.nn.Linear4bit(96, 64, bias=False, compute_dtype=torch.float32, **kw)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, **kw)
    layer = layer.to("cpu").eval()  # eval: where bitsandbytes repacks the weight for its fused CPU kernel
    weight = nf4_reference(layer.weight.data, layer.weight.quant_state.absmax, (64, 96), 64)
    with torch.no_grad():
        for tokens in (1, 3):
            x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
            torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4-dq", "fp4", "int8"])
def test_bnb_bit_equal_to_bitsandbytes(bnb_bases, kind) -> None:  # noqa: ANN001
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState
    from safetensors import safe_open

    path = bnb_bases[kind]
    with open_checkpoint(path) as reader, safe_open(str(path / "model.safetensors"), "pt") as raw:
        keys = _modules(reader)
        assert len(keys) == 2 * len(LINEAR)  # every layer linear, nothing else
        assert "lm_head.weight" in reader.keys() and "lm_head.weight" not in reader.quant.tensors
        assert not any(k.endswith((".absmax", ".SCB", ".quant_map")) or "quant_state" in k for k in reader.keys())
        for key in keys:
            ours = reader.get(key)
            if kind == "int8":
                module = key[: -len(".weight")]
                ref = F.int8_vectorwise_dequant(raw.get_tensor(key), raw.get_tensor(f"{module}.SCB"))
                ref = ref.to(torch.bfloat16)  # the config's compute dtype
            else:
                parts = {k[len(key) + 1 :]: raw.get_tensor(k) for k in raw.keys() if k.startswith(key + ".")}
                ref = F.dequantize_4bit(raw.get_tensor(key), QuantState.from_dict(parts, torch.device("cpu")))
            assert ours.dtype == ref.dtype and ours.shape == ref.shape
            assert torch.equal(ours, ref), key
            assert reader.info(key).shape == tuple(ref.shape)


def test_bnb_matches_transformers_dequantize(bnb_bases) -> None:  # noqa: ANN001
    """transformers' own bnb load + model.dequantize() gives the same weights as our reader."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(bnb_bases["nf4-dq"]), device_map="cpu")
    model.dequantize()
    state = model.state_dict()
    with open_checkpoint(bnb_bases["nf4-dq"]) as reader:
        for key in _modules(reader):
            assert torch.equal(reader.get(key), state[key].to(reader.get(key).dtype)), key


def test_fp8_matches_transformers(fp8_base) -> None:  # noqa: ANN001
    """transformers dequantizes FP8 on a CPU-only load; its weights equal ours."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    model = AutoModelForCausalLM.from_pretrained(str(fp8_base), device_map="cpu", dtype=torch.bfloat16)
    state = model.state_dict()
    op = Fp8Dequantize(None)
    from safetensors import safe_open

    with open_checkpoint(fp8_base) as reader, safe_open(str(fp8_base / "model.safetensors"), "pt") as raw:
        assert reader.quant.summary()["settings"]["block"] == (32, 32)
        for key in _modules(reader):
            ours = reader.get(key)
            assert torch.equal(ours, state[key]), key
            ref = op._dequantize_one(raw.get_tensor(key), raw.get_tensor(key + "_scale_inv"), torch.bfloat16)
            assert torch.equal(ours, ref)
            w = ours.float()
            assert w.abs().max() > 0


def test_fp8_per_tensor_and_ragged_tiles(tmp_path, base16) -> None:  # noqa: ANN001
    from quant_support import fp8_save

    from loratools.checkpoint.quant import fp8

    path = fp8_save(base16, tmp_path / "pt", None)
    with open_checkpoint(path) as reader:
        key = "model.layers.0.mlp.down_proj.weight"
        t = reader.quant.tensors[key]
        assert t.settings["block"] is None
        w = reader.get(key)
        assert w.shape == (64, 96)
    # a grid rounded up at the edges (DeepSeek's ceil-div tiles): 96 columns in 64-wide tiles
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 96, generator=g)
    q, inv = fp8.quantize(dense, (64, 64), torch.float32)
    assert inv.shape == (1, 2)
    back = fp8.dequantize(q, inv, (64, 64), torch.float32, "x")
    ref = q.float().clone()
    ref[:, :64] *= inv[0, 0]
    ref[:, 64:] *= inv[0, 1]
    assert torch.equal(back, ref)
    assert (back - dense).abs().max() < 0.1 * dense.abs().max()


def test_awq_equal_to_autoawq(awq_base) -> None:  # noqa: ANN001
    _, dequantize_gemm = load_awq_packer()
    from safetensors import safe_open

    with open_checkpoint(awq_base) as reader, safe_open(str(awq_base / "model.safetensors"), "pt") as raw:
        for key in _modules(reader):
            m = key[: -len(".weight")]
            ref = dequantize_gemm(
                raw.get_tensor(f"{m}.qweight"), raw.get_tensor(f"{m}.qzeros"), raw.get_tensor(f"{m}.scales"), 4, 16
            )
            ours = reader.get(key)
            assert ours.dtype == torch.float16
            assert torch.equal(ours, ref.T), key


def test_gptq_act_order_v1(gptq_base, base16) -> None:  # noqa: ANN001
    """Against the formula unpacked bit by bit (no GPTQ library runs here: see docs/quantized.md)."""
    from safetensors import safe_open

    with (
        open_checkpoint(gptq_base) as reader,
        open_checkpoint(base16) as b16,
        safe_open(str(gptq_base / "model.safetensors"), "pt") as raw,
    ):
        for key in _modules(reader):
            m = key[: -len(".weight")]
            parts = {r: raw.get_tensor(f"{m}.{r}") for r in ("qweight", "qzeros", "scales", "g_idx")}
            ours = reader.get(key)
            assert torch.equal(ours, gptq_reference(parts)), key
            w16 = b16.get(key).float()
            err = (ours.float() - w16).norm() / w16.norm()
            assert err < 0.15  # a real 4-bit approximation of the base, not noise
        assert "model.layers.0.self_attn.q_proj.qweight" not in reader.keys()
        assert reader.quant.summary()["settings"]["desc_act"] is True
