"""Expert LoRA merged into K-quant GGUF MoE bases (issue 20 item 2), checked in llama.cpp's own runtime.

A tiny Qwen3-MoE (4 experts, 2 layers, every row a whole 256-value K-quant super-block) written f32 by llama.cpp's
own ``convert_hf_to_gguf.py`` (hf_to_gguf.py where it is not set up; the two agree tensor for tensor, see
test_runtime_moe.py) and quantized by libllama's own ``llama_model_quantize`` to Q4_K_M and Q6_K. A
touched K-quant expert tensor keeps its type (loratools' K-quant encoder, byte-equal to libggml's reference
quantizers); where a type cannot be encoded it is written F16 and listed as retyped. Each merged expert holds the
dequantized base plus PEFT's own ΔW within that type's own error on the exact sum (or one F16 step), and in the
runtime the merged model is far nearer PEFT over the dequantized base than the unmerged base is.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hf_to_gguf import convert
from llama_converter import convert_with_llama_cpp, converter
from llama_quantize import quantize
from llamacpp_support import run_cli, run_logits
from test_runtime_moe import _peft_expert_deltas, dequantized, expert_peft, peft_over
from tiny_models import spread_weights

from loratools.ops.merge.kquant_encode import quantize as quantize_k

pytestmark = pytest.mark.filterwarnings("ignore:.*pattern keys did not match")

K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@pytest.fixture(scope="module")
def kcase(runtime, tmp_path_factory) -> SimpleNamespace:
    import transformers as tf

    work = tmp_path_factory.mktemp("kquant")
    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=384, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                            rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                            decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False)  # fmt: skip
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    spread_weights(model)
    folder = work / "base"
    model.save_pretrained(folder)
    f32 = work / "base.gguf"
    if converter() is not None:
        convert_with_llama_cpp(folder, f32)
    else:
        convert(folder, f32)
    with pytest.MonkeyPatch.context() as mp:
        pm = expert_peft(model, work / "lora", mp)
    return SimpleNamespace(folder=folder, model=model, peft=pm, f32=f32, adapter=work / "lora", work=work)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K"])
def test_kquant_experts_merge(kcase, ftype):
    import gguf

    base = quantize(kcase.f32, kcase.work / f"base-{ftype}.gguf", ftype)
    before = {t.name: t for t in gguf.GGUFReader(base).tensors}
    deltas = _peft_expert_deltas(kcase.peft)
    kinds = {before[n].tensor_type.name for n in deltas}
    assert kinds & set(K_TYPES), kinds  # the expert tensors really are K-quants
    out = kcase.work / f"merged-{ftype}.gguf"
    code, text, err = run_cli(["merge", base, kcase.adapter, "-o", out, "--overwrite", "--verify", "--json"])
    assert code == 0, err
    summary = json.loads(text)
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, delta in deltas.items():
        old, new = before[name], after[name]
        want = gguf.quants.dequantize(old.data, old.tensor_type).reshape(delta.shape) + delta.numpy()
        got = gguf.quants.dequantize(new.data, new.tensor_type).reshape(delta.shape)
        if old.tensor_type.name in K_TYPES and new.tensor_type.name == "F16":  # written F16: one F16 step
            assert name in summary["retyped"], (name, summary["retyped"])
            step = np.spacing(np.abs(want).astype(np.float16)).astype(np.float32)
            assert (np.abs(got - want) <= step + 1e-7).all(), (name, float(np.abs(got - want).max()))
        else:  # kept in its type: within the type's own error on the exact target, per expert. The bound is
            # the reference quantizer's (kquant_encode, byte-equal to libggml's in tests/gguf) on ``want`` itself:
            # a ΔW that widens the range widens the step, so the base's own error would be the wrong yardstick.
            assert new.tensor_type == old.tensor_type, (name, old.tensor_type, new.tensor_type)
            assert name not in summary["retyped"], name
            kind = old.tensor_type.name
            for e in range(delta.shape[0]):
                target = want[e].astype(np.float32)
                own = gguf.quants.dequantize(quantize_k(target.reshape(-1), kind), old.tensor_type)
                own_err = np.abs(own.reshape(target.shape) - target).max()
                assert np.abs(got[e] - target).max() <= 1.5 * own_err + 1e-6, (name, e, kind)
    case = SimpleNamespace(model=kcase.model, folder=kcase.folder)
    ref = dequantized(case, base)
    with pytest.MonkeyPatch.context() as mp:
        want = peft_over(ref, kcase.adapter, mp)
    merged = np.abs(run_logits(out).ok() - want).max(-1)
    unmerged = np.abs(run_logits(base).ok() - want).max(-1)
    assert np.isfinite(merged).all() and np.median(merged) < np.median(unmerged) / 5, (ftype, merged, unmerged)


def test_kquant_dims_are_whole_super_blocks(kcase):
    """The fixture's own premise: every expert row is whole 256-value super-blocks (else libllama falls back)."""
    import gguf

    shapes = [t.shape.tolist() for t in gguf.GGUFReader(kcase.f32).tensors if t.name.endswith("_exps.weight")]
    assert shapes and all(s[0] % 256 == 0 for s in shapes), shapes
