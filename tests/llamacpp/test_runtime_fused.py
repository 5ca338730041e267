"""Fused projections in GGUF, both directions (issue 22 §4): llama.cpp's Phi-3 keeps ``attn_qkv`` and
``ffn_up`` (gate + up) fused, a Llama-family GGUF has ``attn_q/k/v`` (Q/K rows permuted per head) and
``ffn_gate/ffn_up``.

A tiny Phi-3 and its Llama-fied twin (the same weights, qkv_proj and gate_up_proj cut into their parts;
transformers' logits equal) give both mismatches:
- an adapter trained on the twin's q/k/v, gate/up onto the Phi-3 GGUF: fused (A's stacked, B block-diagonal);
- a Phi-3 adapter on qkv_proj, gate_up_proj onto the twin's GGUF: split (A shared, rows of B, Q/K permuted).
Oracles: llama.cpp's runtime (base + our GGUF adapter, and our merged GGUF, against PEFT's unmerged model
within the base's own noise) and the ``gguf`` package reading the files back (ΔW per tensor against PEFT's
own ΔW, the merged tensors against PEFT's merge_and_unload, in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_to_gguf import convert, llama_permute
from llamacpp_support import TOL, hf_logits, max_diff, run_cli, run_logits
from test_runtime_adapters import _LINEAR, _TARGETS, peft_adapter
from tiny_models import build

#: fp32 reading back: ΔW of a refactored pair against PEFT's
EXACT = 1e-5


def llamafied(phi3: torch.nn.Module, out: Path) -> tuple[Path, torch.nn.Module]:
    """A LlamaForCausalLM equal to the tiny Phi-3: qkv_proj cut into q/k/v, gate_up_proj into gate/up."""
    import transformers as tf

    c = phi3.config
    cfg = tf.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, head_dim=c.hidden_size // c.num_attention_heads,
                         tie_word_embeddings=False)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    q = c.hidden_size
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    state = {}
    for k, v in phi3.state_dict().items():
        if k.endswith("qkv_proj.weight"):
            stem = k.removesuffix("qkv_proj.weight")
            state |= {f"{stem}q_proj.weight": v[:q], f"{stem}k_proj.weight": v[q : q + kv],
                      f"{stem}v_proj.weight": v[q + kv :]}  # fmt: skip
        elif k.endswith("gate_up_proj.weight"):
            stem = k.removesuffix("gate_up_proj.weight")
            half = v.shape[0] // 2
            state |= {f"{stem}gate_proj.weight": v[:half], f"{stem}up_proj.weight": v[half:]}
        else:
            state[k] = v
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    return out, model


@dataclass
class Twins:
    phi3: tuple[Path, Path]  # (HF folder, f32 GGUF)
    llama: tuple[Path, Path]
    split_adapter: Path  # trained on the Llama twin's q/k/v, gate/up
    split_peft: torch.nn.Module
    fused_adapter: Path  # trained on Phi-3's qkv_proj, gate_up_proj
    fused_peft: torch.nn.Module
    n_head: int
    n_kv: int


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> Twins:
    work = tmp_path_factory.mktemp("fused")
    phi_folder, phi = build("phi3", work / "phi3")
    llama_folder, llama = llamafied(phi, work / "llama")
    assert max_diff(hf_logits(llama), hf_logits(phi)) < 1e-5  # the twins are one model
    split_peft = peft_adapter(llama, work / "split-lora", _LINEAR, seed=3)
    fused_peft = peft_adapter(phi, work / "fused-lora", _TARGETS["phi3"], seed=4)
    return Twins((phi_folder, convert(phi_folder, work / "phi3.gguf")),
                 (llama_folder, convert(llama_folder, work / "llama.gguf")),
                 work / "split-lora", split_peft, work / "fused-lora", fused_peft,
                 phi.config.num_attention_heads, phi.config.num_key_value_heads)  # fmt: skip


CASES = {  # name -> (adapter attribute, base attribute): the adapter meets the other layout
    "fuse": ("split", "phi3"),
    "split": ("fused", "llama"),
}


def _cli(*args) -> None:
    code, out, err = run_cli(list(args))
    assert code == 0, f"loratools {' '.join(map(str, args))}: exit {code}\n{out}\n{err}"


def _case(twins: Twins, case: str, against: str) -> tuple[Path, Path, Path, torch.nn.Module]:
    """(adapter folder, base GGUF, our GGUF adapter written against ``against``, PEFT model)."""
    kind, base = CASES[case]
    folder, gguf_base = getattr(twins, base)
    adapter, peft_model = getattr(twins, f"{kind}_adapter"), getattr(twins, f"{kind}_peft")
    out = gguf_base.parent / f"{case}-{against}.gguf"
    # the adapter was trained on the twin: the same weights under the other architecture, which it names
    _cli("convert", adapter, "--to", "gguf", "--base", folder if against == "hf" else gguf_base, "-o", out,
         "--overwrite", "--allow-other-base")  # fmt: skip
    return adapter, gguf_base, out, peft_model


def _peft_deltas(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Hugging Face module path -> PEFT's own ΔW (get_delta_weight, fp32)."""
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").detach().float()
    return out


def _as_gguf(twins: Twins, case: str, deltas: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """PEFT's ΔW of one layer laid out as the base GGUF's tensors (fused, or split and Q/K permuted)."""
    stem = f"model.layers.{layer}."
    get = deltas.get
    if case == "fuse":
        q, k, v = (get(f"{stem}self_attn.{p}_proj") for p in "qkv")
        gate, up = get(f"{stem}mlp.gate_proj"), get(f"{stem}mlp.up_proj")
        return {f"blk.{layer}.attn_qkv.weight": torch.cat([q, k, v]),
                f"blk.{layer}.ffn_up.weight": torch.cat([gate, up]),
                f"blk.{layer}.attn_output.weight": get(f"{stem}self_attn.o_proj"),
                f"blk.{layer}.ffn_down.weight": get(f"{stem}mlp.down_proj")}  # fmt: skip
    qkv, gate_up = get(f"{stem}self_attn.qkv_proj"), get(f"{stem}mlp.gate_up_proj")
    qn = twins.n_head * qkv.shape[0] // (twins.n_head + 2 * twins.n_kv)
    kn = (qkv.shape[0] - qn) // 2
    half = gate_up.shape[0] // 2

    def perm(w: torch.Tensor, heads: int) -> torch.Tensor:
        return torch.from_numpy(llama_permute(w.numpy(), heads))

    return {f"blk.{layer}.attn_q.weight": perm(qkv[:qn], twins.n_head),
            f"blk.{layer}.attn_k.weight": perm(qkv[qn : qn + kn], twins.n_kv),
            f"blk.{layer}.attn_v.weight": qkv[qn + kn :], f"blk.{layer}.ffn_gate.weight": gate_up[:half],
            f"blk.{layer}.ffn_up.weight": gate_up[half:],
            f"blk.{layer}.attn_output.weight": get(f"{stem}self_attn.o_proj"),
            f"blk.{layer}.ffn_down.weight": get(f"{stem}mlp.down_proj")}  # fmt: skip


@pytest.mark.parametrize("against", ["hf", "gguf"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_reads_back_as_peft_delta(twins, case, against):
    """The gguf package reads our file: each pair's B·A (alpha 0: scale 1) is PEFT's ΔW in the base's layout."""
    import gguf

    _, _, out, peft_model = _case(twins, case, against)
    r = gguf.GGUFReader(out)
    assert float(r.fields[gguf.Keys.Adapter.LORA_ALPHA].contents()) == 0.0
    tensors = {t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist()))) for t in r.tensors}
    deltas = _peft_deltas(peft_model)
    want = {k: v for i in range(2) for k, v in _as_gguf(twins, case, deltas, i).items()}
    got = {stem: tensors[f"{stem}.lora_b"].float() @ tensors[f"{stem}.lora_a"].float()
           for stem in {n.rsplit(".", 1)[0] for n in tensors}}  # fmt: skip
    assert set(got) == set(want)
    for name, d in want.items():
        assert float((got[name] - d).abs().max()) < EXACT * max(1.0, float(d.abs().max())), name
    if case == "fuse":  # ranks summed per part: q 4 + k 2 (rank_pattern) + v 4
        assert tensors["blk.0.attn_qkv.weight.lora_a"].shape == (10, 64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_gguf_reads_back_as_peft_merge(twins, case):
    """``merge base.gguf ADAPTER``: every touched tensor equals PEFT's merge_and_unload in the base's layout."""
    import gguf

    kind, base = CASES[case]
    _, gguf_base = getattr(twins, base)
    adapter, peft_model = getattr(twins, f"{kind}_adapter"), getattr(twins, f"{kind}_peft")
    out = gguf_base.parent / f"merged-{case}.gguf"
    _cli("merge", gguf_base, adapter, "-o", out, "--overwrite", "--verify")
    merged = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    original = {t.name: np.array(t.data) for t in gguf.GGUFReader(gguf_base).tensors}
    deltas = _peft_deltas(peft_model)
    for i in range(2):
        for name, d in _as_gguf(twins, case, deltas, i).items():
            diff = np.abs(merged[name] - original[name] - d.numpy()).max()
            assert diff < EXACT, (name, diff)


@pytest.mark.parametrize("against", ["hf", "gguf"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_in_runtime(twins, runtime, case, against):
    _, gguf_base, out, peft_model = _case(twins, case, against)
    want, base_logits = hf_logits(peft_model), run_logits(gguf_base).ok()
    with peft_model.disable_adapter():
        noise = max_diff(base_logits, hf_logits(peft_model))
    tol = max(TOL, 2 * noise)
    assert max_diff(want, base_logits) > 50 * tol
    diff = max_diff(run_logits(gguf_base, out).ok(), want)
    assert diff < tol, f"{case}: {diff} off PEFT (base noise {noise})"


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_in_runtime(twins, runtime, case):
    kind, base = CASES[case]
    _, gguf_base = getattr(twins, base)
    adapter, peft_model = getattr(twins, f"{kind}_adapter"), getattr(twins, f"{kind}_peft")
    out = gguf_base.parent / f"merged-rt-{case}.gguf"
    _cli("merge", gguf_base, adapter, "-o", out, "--overwrite")
    want = hf_logits(peft_model)
    with peft_model.disable_adapter():
        noise = max_diff(run_logits(gguf_base).ok(), hf_logits(peft_model))
    diff = max_diff(run_logits(out).ok(), want)
    assert diff < max(TOL, 2 * noise), f"{case}: merged {diff} off PEFT (base noise {noise})"


def test_the_twins_adapter_needs_allow_other_base(twins, tmp_path):
    """convert --base checks the base as merge does: the Llama twin's adapter names LlamaForCausalLM, the base is
    Phi-3 — refused in one line that names the flag, written with it (the tests above)."""
    out = tmp_path / "a.gguf"
    code, _, err = run_cli(["convert", twins.split_adapter, "--to", "gguf", "--base", twins.phi3[0], "-o", out])
    assert code == 2 and "--allow-other-base" in err and "phi3" in err and not out.exists(), err
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1, err
