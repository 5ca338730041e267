"""Merging into a GGUF base: untouched tensors byte for byte, metadata and tokenizer kept, touched ones in
their own type (K-quants too, by llama.cpp's quantizer), and the merged F32 model equal to PEFT's merge_and_unload
converted the way llama.cpp's converter converts it."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf_support import FIXTURES, GGUF, llama_permute, run_cli

from loratools.errors import UnsupportedError
from loratools.model.adapter import Adapter, LoraModule
from loratools.ops.merge.gguf import merge_gguf

PEFT = FIXTURES / "peft"


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_merge_f32_equals_peft_merge_converted(work):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = work / "merged-f32.gguf"
    summary = merge_gguf(GGUF / "llama-f32.gguf", [PEFT / "llama-rslora"], out, verify=True)
    assert summary.tensors_changed == 8 and summary.retyped == [] and summary.to_dict()["verified"] is True
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "bases" / "llama")
    merged = PeftModel.from_pretrained(base, PEFT / "llama-rslora").merge_and_unload().state_dict()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    got, before = tensors(out), tensors(GGUF / "llama-f32.gguf")
    moved = 0.0
    for key, w in merged.items():
        if key.endswith("q_proj.weight"):
            w = llama_permute(w, 4, 4)
        elif key.endswith("k_proj.weight"):
            w = llama_permute(w, 4, 2)
        name = tmap.get_name(key, try_suffixes=(".weight",))
        have = torch.from_numpy(np.array(got[name].data)).reshape(w.shape)
        moved = max(moved, float((have - torch.from_numpy(np.array(before[name].data)).reshape(w.shape)).abs().max()))
        assert float((have - w).abs().max()) <= 1e-6 * max(1.0, float(w.abs().max())), name
    assert moved > 1e-2


def test_merge_q8_0_keeps_types_bytes_and_metadata(work):
    out = work / "merged-q8.gguf"
    summary = merge_gguf(
        GGUF / "llama-q8_0.gguf", [PEFT / "llama-rslora", PEFT / "llama-embed"], out, weights=[1.0, -0.5], verify=True
    )
    assert summary.tensors_changed == 11 and summary.retyped == []
    before, after = gguf.GGUFReader(GGUF / "llama-q8_0.gguf"), gguf.GGUFReader(out)
    for f in before.fields.values():
        if not f.name.startswith("GGUF."):
            assert after.fields[f.name].contents() == f.contents(), f.name
    changed = {"token_embd.weight"} | {f"blk.{i}.{t}.weight" for i in (0, 1) for t in ("attn_q", "attn_v", "ffn_up")}
    for a, b in zip(before.tensors, after.tensors, strict=True):
        assert a.name == b.name and a.tensor_type == b.tensor_type
        same = np.array_equal(np.asarray(a.data), np.asarray(b.data))
        assert same == (a.name not in changed and "ffn_down" not in a.name and "attn_output" not in a.name), a.name


def _kquant_adapter() -> Adapter:
    g = torch.Generator().manual_seed(3)

    def mod(out: int, inp: int, r: int = 4, alpha: float = 6.0) -> LoraModule:
        return LoraModule(torch.randn(r, inp, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.1, alpha=alpha)

    return Adapter(
        {
            "model.layers.0.self_attn.q_proj": mod(256, 256),  # Q4_K kept
            "model.layers.0.self_attn.o_proj": mod(256, 256),  # Q8_0 kept
            "model.layers.0.mlp.up_proj": mod(256, 256),  # F16 kept
            "model.layers.0.mlp.down_proj": mod(256, 256, alpha=2.0),  # Q6_K kept
        }
    )


def test_merge_k_quants_keep_their_type(work):
    from loratools.ops.merge.kquant_encode import quantize

    out = work / "merged-k.gguf"
    summary = merge_gguf(GGUF / "kquant.gguf", [_kquant_adapter()], out, verify=True)
    assert summary.retyped == []
    got, before = tensors(out), tensors(GGUF / "kquant.gguf")
    assert got["blk.0.attn_q.weight"].tensor_type.name == "Q4_K"
    assert got["blk.0.ffn_down.weight"].tensor_type.name == "Q6_K"
    assert got["blk.0.attn_output.weight"].tensor_type.name == "Q8_0"
    assert got["blk.0.attn_k.weight"].tensor_type.name == "Q5_K"  # untouched: kept, byte for byte
    assert np.array_equal(np.asarray(got["blk.0.attn_k.weight"].data), np.asarray(before["blk.0.attn_k.weight"].data))
    m = _kquant_adapter().modules["model.layers.0.self_attn.q_proj"]
    old = gguf.quants.dequantize(before["blk.0.attn_q.weight"].data, before["blk.0.attn_q.weight"].tensor_type)
    want = torch.from_numpy(old) + llama_permute(m.delta(), 4, 4)
    q4k = gguf.GGMLQuantizationType.Q4_K
    have = torch.from_numpy(gguf.quants.dequantize(got["blk.0.attn_q.weight"].data, q4k))
    best = torch.from_numpy(gguf.quants.dequantize(quantize(want.numpy(), "Q4_K").reshape(256, -1), q4k))
    rms, best_rms = float((have - want).pow(2).mean().sqrt()), float((best - want).pow(2).mean().sqrt())
    assert rms <= 1.05 * best_rms  # as close as llama.cpp's own quantizer gets to the exact sum
    moved, delta = (have - torch.from_numpy(old)).reshape(-1), llama_permute(m.delta(), 4, 4).reshape(-1)
    assert float(torch.nn.functional.cosine_similarity(moved, delta, dim=0)) > 0.5  # parity: the merge moved it by ΔW


def test_merge_refuses_before_writing(work):
    out = work / "never.gguf"
    with pytest.raises(UnsupportedError, match="DoRA"):
        merge_gguf(GGUF / "llama-f32.gguf", [PEFT / "llama-dora"], out)
    assert not out.exists()


def test_merge_into_gguf_cli(work):
    out = work / "cli" / "merged.gguf"
    code, stdout, err = run_cli(
        ["merge", str(GGUF / "llama-q8_0.gguf"), str(PEFT / "llama-rslora"), "-o", str(out), "--verify", "--json"]
    )
    assert code == 0, err
    d = json.loads(stdout)
    assert d["verified"] is True and d["tensors_changed"] == 8 and d["retyped"] == []
    code, _, err = run_cli(["merge", str(GGUF / "llama-q8_0.gguf"), str(PEFT / "llama-rslora"), "-o",
                            str(work / "cli" / "m2.gguf"), "--dtype", "fp16"])  # fmt: skip
    assert code != 0 and "GGUF" in err
