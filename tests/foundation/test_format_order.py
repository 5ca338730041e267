"""Format detection follows ``_BUILTIN``'s priority, not import order: with PEFT's module imported first (as any
earlier command or test may do), an mlx-lm folder is still detected as mlx, not as the PEFT folder it resembles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_detection_does_not_depend_on_which_format_module_was_imported_first(tmp_path: Path) -> None:
    code = f"""
import loratools.formats.peft.format  # registered first
from loratools import load_adapter, save_adapter
from loratools.formats.registry import detect_format
save_adapter(load_adapter({str(ROOT / 'fixtures/peft/llama-lora')!r}), {str(tmp_path / 'mlx')!r}, format="mlx")
from loratools.formats.registry import _in_priority
print(",".join(f.name for f in _in_priority()[:3]))
print(detect_format({str(tmp_path / 'mlx')!r}).name)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    order, detected = r.stdout.split()[-2:]
    assert order == "mlx,vllm-moe,peft" and detected == "mlx", r.stdout
