"""llama.cpp's own runtime against PEFT's unmerged model, for every architecture loratools maps to GGUF.

Per architecture: a tiny seeded model, written as an f32 GGUF base (hf_to_gguf.py), whose runtime logits
equal transformers' (the base's own noise: ~5e-6, ~1.4e-3 for Gemma, whose GELU ggml takes from an fp16
table); a PEFT adapter with rsLoRA and rank/alpha patterns on every linear module. Then, all positions:
base GGUF + ``convert --to gguf`` adapter (written against the Hugging Face folder and against the GGUF
itself) and ``merge base.gguf ADAPTER`` (the PEFT folder and the GGUF adapter) each equal PEFT's logits
within the base's own noise, while the adapter moves them by far more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_to_gguf import convert
from llamacpp_support import TOL, hf_logits, max_diff, run_cli, run_logits
from tiny_models import build

ARCHS = ["llama", "llama-tied", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    arch: str
    folder: Path
    gguf: Path
    adapter: Path
    want: np.ndarray  # PEFT's unmerged logits
    noise: float  # the base runtime's own distance from transformers
    effect: float  # how far the adapter moves PEFT's logits

    @property
    def tol(self) -> float:
        return max(TOL, 2 * self.noise)


def peft_adapter(model: torch.nn.Module, out: Path, targets: list[str], seed: int = 1, **extra) -> torch.nn.Module:
    """A saved PEFT adapter with non-zero B on ``targets``: rsLoRA, a rank and an alpha pattern."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    patterns = {"rank_pattern": {targets[1]: 2}, "alpha_pattern": {targets[-1]: 3.0}}
    cfg = LoraConfig(r=4, lora_alpha=6, use_rslora=True, init_lora_weights=False, target_modules=targets,
                     **{**patterns, **extra})  # fmt: skip
    peft_model = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.fixture(scope="module", params=ARCHS)
def case(request, runtime, tmp_path_factory) -> Case:
    arch = request.param
    work = tmp_path_factory.mktemp(arch)
    folder, model = build(arch, work / "base")
    base_logits = hf_logits(model)
    gguf = convert(folder, work / "base.gguf")
    noise = max_diff(run_logits(gguf).ok(), base_logits)
    assert noise < (3e-3 if arch.startswith("gemma") else 5e-5), f"{arch}: the GGUF base itself is {noise} off"
    peft_model = peft_adapter(model, work / "lora", _TARGETS.get(arch, _LINEAR))
    want = hf_logits(peft_model)
    return Case(arch, folder, gguf, work / "lora", want, noise, max_diff(want, base_logits))


def _cli(*args) -> None:
    code, out, err = run_cli(list(args))
    assert code == 0, f"loratools {' '.join(map(str, args))}: exit {code}\n{out}\n{err}"


@pytest.mark.parametrize("against", ["hf", "gguf"])
def test_adapter_in_runtime(case, against):
    out = case.gguf.parent / f"adapter-{against}.gguf"
    _cli("convert", case.adapter, "--to", "gguf", "--base", case.folder if against == "hf" else case.gguf,
         "-o", out, "--overwrite")  # fmt: skip
    got = run_logits(case.gguf, out).ok()
    diff = max_diff(got, case.want)
    assert case.effect > 50 * case.tol, case.effect
    assert diff < case.tol, f"{case.arch}: {diff} off PEFT (base noise {case.noise}, effect {case.effect})"


@pytest.mark.parametrize("source", ["peft", "gguf"])
def test_merged_in_runtime(case, source):
    adapter = case.adapter
    if source == "gguf":
        adapter = case.gguf.parent / "for-merge.gguf"
        _cli("convert", case.adapter, "--to", "gguf", "--base", case.gguf, "-o", adapter, "--overwrite")
    out = case.gguf.parent / f"merged-{source}.gguf"
    _cli("merge", case.gguf, adapter, "-o", out, "--overwrite")
    diff = max_diff(run_logits(out).ok(), case.want)
    assert diff < case.tol, f"{case.arch}: merged {diff} off PEFT (base noise {case.noise}, effect {case.effect})"


def _headless(src: Path, dst: Path) -> Path:
    """``src`` rewritten the way llama.cpp's convert_lora_to_gguf.py writes an adapter: architecture, type
    and alpha only (no block or head counts), the same tensors."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(r.fields[gguf.Keys.Adapter.LORA_ALPHA].contents()))
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=tuple(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert not any(k.startswith(f"{arch}.") for k in gguf.GGUFReader(dst).fields)
    return dst


def test_headless_gguf_adapter_merges_with_the_bases_heads(case):
    """Issue 22 §1.4: a GGUF adapter without head counts (llama.cpp's own converter writes none) merges into
    a GGUF base with the base's (Llama's Q/K rows are un-permuted with them), and runs as it is."""
    ours = case.gguf.parent / "for-headless.gguf"
    _cli("convert", case.adapter, "--to", "gguf", "--base", case.gguf, "-o", ours, "--overwrite")
    headless = _headless(ours, case.gguf.parent / "headless.gguf")
    out = case.gguf.parent / "merged-headless.gguf"
    _cli("merge", case.gguf, headless, "-o", out, "--overwrite", "--verify")
    assert max_diff(run_logits(out).ok(), case.want) < case.tol
    assert max_diff(run_logits(case.gguf, headless).ok(), case.want) < case.tol
