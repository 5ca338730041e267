"""The GGUF plan across fused and split projections, without a runtime (tests/llamacpp/test_runtime_fused.py
runs the same in llama.cpp): exact factors, one pair per tensor, and refusals that name the modules."""

from __future__ import annotations

import torch

from loratools.formats.gguf.names import ARCHITECTURES, GgufBase
from loratools.formats.gguf.plan import plan
from loratools.model.adapter import Adapter, LoraModule

PHI3 = GgufBase("phi3.gguf", ARCHITECTURES["Phi3ForCausalLM"], n_layer=1, n_head=4, n_head_kv=2, tied=False)
LLAMA = GgufBase("llama.gguf", ARCHITECTURES["LlamaForCausalLM"], n_layer=1, n_head=4, n_head_kv=2, tied=False)
ATTN = "model.layers.0.self_attn."


def _lora(rank: int, out: int, alpha: float, seed: int, **kw) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(down=torch.randn(rank, 64, generator=g), up=torch.randn(out, rank, generator=g), alpha=alpha,
                      **kw)  # fmt: skip


def _delta(m: LoraModule) -> torch.Tensor:
    up, down = m.factors()
    return m.scale * up @ down


def test_fused_module_beside_its_parts_is_one_exact_pair():
    """qkv_proj and q_proj on one layer both land on attn_qkv: one pair, ΔW their sum, rank the sum."""
    qkv, q = _lora(4, 128, 6.0, 1, use_rslora=True), _lora(2, 64, 3.0, 2)
    p = plan(Adapter(modules={f"{ATTN}qkv_proj": qkv, f"{ATTN}q_proj": q}), PHI3)
    assert not p.problems
    (pair,) = p.pairs
    assert pair.tensor == "blk.0.attn_qkv.weight" and pair.lora_a.shape == (6, 64)
    want = _delta(qkv)
    want[:64] += _delta(q)
    assert torch.allclose(pair.lora_b @ pair.lora_a, want, atol=1e-5)


def test_split_of_zero_rows_writes_no_pair():
    """A fused LoRA whose V rows of B are zero changes nothing there: no attn_v pair."""
    qkv = _lora(4, 128, 8.0, 3)
    qkv.up[96:] = 0
    p = plan(Adapter(modules={f"{ATTN}qkv_proj": qkv}), LLAMA)
    assert not p.problems
    assert [x.tensor for x in p.pairs] == ["blk.0.attn_q.weight", "blk.0.attn_k.weight"]


def test_widths_that_do_not_fit_the_heads_are_refused_naming_the_modules():
    p = plan(Adapter(modules={f"{ATTN}q_proj": _lora(4, 64, 8.0, 4), f"{ATTN}k_proj": _lora(4, 48, 8.0, 5)}), PHI3)
    assert not p.pairs
    (problem,) = p.problems
    assert problem.code == "shape" and f"{ATTN}k_proj" in problem.message and "head sizes" in problem.message
    p = plan(Adapter(modules={f"{ATTN}qkv_proj": _lora(4, 100, 8.0, 6)}), LLAMA)
    assert [x.code for x in p.problems] == ["shape"] and "do not split" in p.problems[0].message


def test_dora_part_is_refused_as_dora_and_the_plain_parts_still_fuse():
    dora = _lora(4, 64, 8.0, 7, magnitude=torch.ones(64))
    p = plan(Adapter(modules={f"{ATTN}q_proj": dora, f"{ATTN}v_proj": _lora(4, 32, 8.0, 8)}), PHI3)
    assert [x.code for x in p.problems] == ["dora"] and p.problems[0].module == f"{ATTN}q_proj"
