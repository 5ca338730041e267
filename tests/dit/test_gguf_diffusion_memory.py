"""A merge into a GGUF diffusion file streams it one tensor at a time: memory O(one tensor), not O(model). A
Flux-named Q8_0 file of 4 and of 12 double blocks (each an img_attn.qkv of 6144 x 2048: 48 MiB in fp32, 13 MB
stored) gets a kohya LoRA on every block; each merge runs in a child process reporting its own peak RSS (VmHWM)
before and after. Holding the dequantized model would add 8 x 48 MiB; the bar is a third of that."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

H = 2048
CHILD = """
import json, re, sys
from loratools import merge
import torch  # noqa: F401 - what the merge imports, before the baseline

def peak_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+)", f.read())[1])

before = peak_kib()
merge(sys.argv[1], [sys.argv[2]], sys.argv[3])
print(json.dumps({"before_kib": before, "after_kib": peak_kib()}))
"""


def _files(tmp: Path, blocks: int) -> tuple[Path, Path]:
    import gguf
    from safetensors.torch import save_file

    base, lora = tmp / f"flux-{blocks}-Q8_0.gguf", tmp / f"lora-{blocks}.safetensors"
    w = gguf.GGUFWriter(base, "flux")
    rng = np.random.default_rng(blocks)
    adapter = {}
    for i in range(blocks):
        name = f"double_blocks.{i}.img_attn.qkv.weight"
        values = (rng.standard_normal((3 * H, H), dtype=np.float32) * 0.02).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        stem = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        adapter[f"{stem}.lora_down.weight"] = torch.randn(4, H) * 0.01
        adapter[f"{stem}.lora_up.weight"] = torch.randn(3 * H, 4) * 0.01
        adapter[f"{stem}.alpha"] = torch.tensor(2.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(adapter, str(lora))
    return base, lora


def _peak_mib(tmp: Path, blocks: int) -> float:
    base, lora = _files(tmp, blocks)
    out = tmp / f"merged-{blocks}.gguf"
    run = subprocess.run([sys.executable, "-c", CHILD, str(base), str(lora), str(out)], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0 <= out.stat().st_size - base.stat().st_size < 4096  # the same tensors, plus the provenance record
    return (rss["after_kib"] - rss["before_kib"]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the child's peak RSS from /proc")
def test_gguf_diffusion_merge_memory_does_not_grow_with_the_model(tmp_path: Path) -> None:
    peak4, peak12 = _peak_mib(tmp_path, 4), _peak_mib(tmp_path, 12)
    grown = 8 * 3 * H * H * 4 / 2**20  # the dequantized model's growth, MiB
    assert peak12 - peak4 < grown / 3, f"peak RSS {peak4:.0f} MiB (4 blocks) -> {peak12:.0f} MiB (12 blocks)"
