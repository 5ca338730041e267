"""A merge into a fused expert tensor streams it a run of experts at a time (issue 20.2): memory O(one expert
slice), not O(E·in·out). A Qwen3-MoE-shaped checkpoint holding its experts fused (transformers-5 in-memory
layout: ``experts.gate_up_proj`` (E, 2I, H), ``experts.down_proj`` (E, H, I), bf16) gets a PEFT
``target_parameters`` LoRA on both, with 8 and with 32 experts of the same size; each merge runs in a child
process that reports its own peak RSS (VmHWM, see CHILD) before and after the merge. Quadrupling the experts
quadruples the fused tensors (32 MiB -> 128 MiB for gate_up_proj); the merge's own peak must not follow them.
The bytes of such a streamed merge are the whole-tensor merge's (tests/moe/test_moe_merge.py checks the logits;
the pieces keep the row blocks of the whole tensor)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratools.files.safetensors_file import save_file

HIDDEN, INTER, RANK = 2048, 512, 8
#: the child's own peak RSS is VmHWM (/proc/self/status): its ru_maxrss also counts the forking pytest process's
#: RSS at exec (Linux keeps the old memory map's high-water mark in the signal struct), VmHWM starts at the exec
CHILD = """
import json, re, sys
from loratools import merge
import torch  # noqa: F401 - what the merge imports, before the baseline

def peak_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+)", f.read())[1])

before = peak_kib()
merge(sys.argv[1], [sys.argv[2]], sys.argv[3], dtype=sys.argv[4])
print(json.dumps({"before_kib": before, "after_kib": peak_kib()}))
"""


def _fused_base(folder: Path, experts: int) -> None:
    folder.mkdir()
    g = torch.Generator().manual_seed(experts)
    p = "model.layers.0.mlp.experts"
    tensors = {
        f"{p}.gate_up_proj": torch.randn(experts, 2 * INTER, HIDDEN, generator=g).to(torch.bfloat16),
        f"{p}.down_proj": torch.randn(experts, HIDDEN, INTER, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.gate.weight": torch.randn(experts, HIDDEN, generator=g).to(torch.bfloat16),
    }
    save_file(tensors, folder / "model.safetensors")
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": HIDDEN,
        "moe_intermediate_size": INTER,
        "num_experts": experts,
        "num_hidden_layers": 1,
        "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))


def _expert_lora(folder: Path, experts: int) -> None:
    """PEFT's ParamWrapper layout: gate_up_proj (registered first) is the inner wrapper (``base_layer``);
    lora_A (E·r, in), lora_B (out, E·r), random and non-zero."""
    folder.mkdir()
    g = torch.Generator().manual_seed(100 + experts)
    p = "base_model.model.model.layers.0.mlp.experts"
    tensors = {}
    for wrapper, (out, inp) in ((f"{p}.base_layer", (2 * INTER, HIDDEN)), (p, (HIDDEN, INTER))):
        tensors[f"{wrapper}.lora_A.weight"] = torch.randn(experts * RANK, inp, generator=g) * 0.02
        tensors[f"{wrapper}.lora_B.weight"] = torch.randn(out, experts * RANK, generator=g) * 0.02
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "base_model_name_or_path": None,
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _merge_peak_mib(tmp: Path, experts: int, dtype: str) -> float:
    base, adapter, out = tmp / f"base-{experts}", tmp / f"lora-{experts}", tmp / f"merged-{experts}-{dtype}"
    if not base.exists():
        _fused_base(base, experts)
        _expert_lora(adapter, experts)
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(base), str(adapter), str(out), dtype],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    assert (out / "model.safetensors").stat().st_size > (base / "model.safetensors").stat().st_size // 2
    return (rss["after_kib"] - rss["before_kib"]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the child's peak RSS from /proc")
@pytest.mark.parametrize("dtype", ["auto", "fp32"])
def test_fused_expert_merge_memory_does_not_grow_with_the_expert_count(dtype: str, tmp_path: Path) -> None:
    peak8 = _merge_peak_mib(tmp_path, 8, dtype)
    peak32 = _merge_peak_mib(tmp_path, 32, dtype)
    grown = (32 - 8) * 2 * INTER * HIDDEN * (2 if dtype == "auto" else 4) / 2**20  # gate_up_proj's growth, MiB
    # whole-tensor merging grew by more than the tensor (126 -> 466 MiB for fp32); streaming stays flat, though a
    # loaded machine was seen adding some tens of MiB of pages it had not yet released: half the growth is the bar
    assert peak32 - peak8 < grown / 2, (
        f"the merge's own peak RSS grew from {peak8:.0f} MiB (8 experts) to {peak32:.0f} MiB (32 experts); "
        f"the fused gate_up_proj grew by {grown:.0f} MiB"
    )


def _mxfp4_base(folder: Path, experts: int) -> None:
    """A gpt-oss-shaped MXFP4 base (``*_blocks``/``*_scales``, experts (E, in, out) once dequantized): random
    code bytes and scales near 2^-7 (any byte is a valid pair of E2M1 codes; packing real weights is slow)."""
    folder.mkdir()
    g = torch.Generator().manual_seed(experts)
    p = "model.layers.0.mlp.experts"
    tensors = {"model.layers.0.mlp.router.weight": torch.randn(experts, HIDDEN, generator=g).to(torch.bfloat16)}
    for name, (n_in, rows) in (("gate_up_proj", (HIDDEN, 2 * INTER)), ("down_proj", (INTER, HIDDEN))):
        tensors[f"{p}.{name}_blocks"] = torch.randint(0, 256, (experts, rows, n_in // 32, 16), generator=g).to(
            torch.uint8
        )
        tensors[f"{p}.{name}_scales"] = torch.randint(118, 122, (experts, rows, n_in // 32), generator=g).to(
            torch.uint8
        )
    save_file(tensors, folder / "model.safetensors")
    config = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_local_experts": experts,
        "num_hidden_layers": 1,
        "dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4"},
    }
    (folder / "config.json").write_text(json.dumps(config))


def _mxfp4_merge_peak(tmp_path: Path, experts: int, child: str) -> tuple[Path, Path, float]:
    """(base, output, the merge's own peak RSS growth in MiB) of merging an expert LoRA into an MXFP4 base of
    ``experts`` experts in a child process running ``child``."""
    base, adapter, out = tmp_path / f"mx-{experts}", tmp_path / f"lora-{experts}", tmp_path / f"out-{experts}"
    _mxfp4_base(base, experts)
    _expert_lora(adapter, experts)
    run = subprocess.run(
        [sys.executable, "-c", child, str(base), str(adapter), str(out), "auto"],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    return base, out, (rss["after_kib"] - rss["before_kib"]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the child's peak RSS from /proc")
def test_mxfp4_expert_merge_memory_does_not_grow_with_the_expert_count(tmp_path: Path) -> None:
    """The 16-bit merge of an MXFP4 base dequantizes, updates and writes a run of experts at a time
    (ops/merge/quant_stream.py); dequantizing the whole tensor held ~5x its fp32 size in temporaries."""
    peaks = {}
    for experts in (8, 32):
        base, out, peaks[experts] = _mxfp4_merge_peak(tmp_path, experts, CHILD)
        assert (out / "model.safetensors").stat().st_size > 3 * (base / "model.safetensors").stat().st_size
    grown = (32 - 8) * 2 * INTER * HIDDEN * 2 / 2**20  # the dequantized bf16 gate_up_proj's growth, MiB
    assert peaks[32] - peaks[8] < grown / 2, (
        f"the MXFP4 merge's own peak RSS grew from {peaks[8]:.0f} MiB (8 experts) to {peaks[32]:.0f} MiB "
        f"(32 experts); the dequantized gate_up_proj grew by {grown:.0f} MiB"
    )


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the child's peak RSS from /proc")
def test_mxfp4_requantize_memory_does_not_grow_with_the_expert_count(tmp_path: Path) -> None:
    """``--requantize`` into an MXFP4 base reads, dequantizes, merges and requantizes a run of experts at a time
    (ops/merge/requant_stream.py); the whole-tensor requantize held the fused tensor in fp32 several times over
    (bench_moe.py: 1.5 GB at 8 experts -> 4.7 GB at 32 at Qwen3-MoE's sizes)."""
    child = CHILD.replace("dtype=sys.argv[4])", "dtype=sys.argv[4], requantize=True)")
    peaks = {}
    for experts in (8, 32):
        base, out, peaks[experts] = _mxfp4_merge_peak(tmp_path, experts, child)
        size = (base / "model.safetensors").stat().st_size  # still MXFP4 (the header gains provenance)
        assert size <= (out / "model.safetensors").stat().st_size < size + 65536
    grown = (32 - 8) * 2 * INTER * HIDDEN * 4 / 2**20  # the fp32 gate_up_proj's growth, MiB
    # measured 250-370 -> 310-420 MiB streamed (growth 20-150 MiB: a loaded machine's allocator adds tens of MiB
    # either way, so the bar is three fp32 gate_up_proj growths, 576 MiB); the whole-tensor requantize it replaces
    # grew 779 -> 2985 MiB here, ~4x this bar
    assert peaks[32] - peaks[8] < 3 * grown, (
        f"the MXFP4 --requantize merge's own peak RSS grew from {peaks[8]:.0f} MiB (8 experts) to "
        f"{peaks[32]:.0f} MiB (32 experts); the bar is 3x the fp32 gate_up_proj's growth, {3 * grown:.0f} MiB"
    )
