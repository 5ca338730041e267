"""extract streams: its peak memory is one tensor pair's working set, not the checkpoints.

One process runs extract on a tiny pair (imports and code paths: the floor of its peak RSS), then on a
2 × 160 MB pair of 8 MB tensors. The second run may raise the peak by at most ~100 MB — about a dozen
tensors' worth — while holding either checkpoint (or the memory map of one) would cost 160 MB+.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
from loratools import extract
for root in sys.argv[1:]:
    res = extract(root + "/base", root + "/tuned", rank=2, threshold=64)
    print(len(res.adapter.modules), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _pair(root, n: int, rows: int, cols: int) -> None:
    """base and tuned (fp32, one file each): tuned changes tensor 0 by a rank-1 delta, the rest are equal."""
    import torch

    from loratools.checkpoint.writer import SafetensorsWriter, TensorEntry

    entries = [TensorEntry(f"model.layers.{i}.mlp.up_proj.weight", "F32", (rows, cols)) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) * 0.02
    change = torch.randn(rows, 1, generator=g) @ torch.randn(1, cols, generator=g) * 0.01
    for name, delta in (("base", None), ("tuned", change)):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
        with SafetensorsWriter(root / name / "model.safetensors", entries, {"format": "pt"}) as wr:
            for i, e in enumerate(entries):
                wr.write(e.name, w + delta if (i == 0 and delta is not None) else w + i)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's unit")
def test_extract_peak_memory_is_one_tensor_pair(tmp_path) -> None:
    try:
        _pair(tmp_path / "small", 2, 16, 32)
        _pair(tmp_path / "big", 20, 1024, 2048)  # 20 × 8 MB per checkpoint
        roots = [str(tmp_path / "small"), str(tmp_path / "big")]
        r = subprocess.run([sys.executable, "-c", SCRIPT, *roots], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        small_modules, floor, big_modules, peak = map(int, r.stdout.split()[-4:])
        assert small_modules == big_modules == 1
        assert peak - floor < 100, f"extract peaked {peak - floor} MB above the floor of {floor} MB"
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
