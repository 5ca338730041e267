"""SIGTERM in the middle of a write: no hidden temporaries left, the old output kept (issue 14.20).

A real ``python -m loratools merge`` pauses after writing its weight file (the merge test hook); the test
waits for the temporary folder to hold it, polling with a generous bound (no wall-time assumption about
how fast the machine is), then signals the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_support import LLAMA_BASE, LLAMA_LORA, ROOT, tree_digest

#: generous bounds: a loaded machine may take long to start Python and import torch
START_BOUND_S = 600
EXIT_BOUND_S = 600


def _merge(out: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "LORATOOLS_MERGE_TEST_PAUSE": "3600", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "loratools", "merge", str(LLAMA_BASE), str(LLAMA_LORA), "-o", str(out), *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,
    )


def _default_signals() -> None:
    """A shell's background job inherits SIGINT ignored (and Python then keeps it ignored): undo that."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _wait_for_written_temporary(folder: Path, name: str, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + START_BOUND_S
    while time.monotonic() < deadline:
        for d in folder.glob(f".{name}.loratools-tmp-*"):
            if any(d.glob("*.safetensors")):
                return d
        if proc.poll() is not None:
            pytest.fail(f"merge ended before writing: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the merge never wrote its weight file")


def test_sigterm_mid_write_leaves_no_temporary(tmp_path: Path) -> None:
    """SIGINT took this path already (KeyboardInterrupt); SIGTERM killed the process on the spot."""
    sig = signal.SIGTERM
    proc = _merge(tmp_path / "out", tmp_path)
    tmp = _wait_for_written_temporary(tmp_path, "out", proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=EXIT_BOUND_S)
    err = proc.stderr.read()
    assert not tmp.exists(), f"{tmp.name} left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], err
    assert code == 128 + sig, (code, err)
    assert "nothing was published" in err and "Traceback" not in err, err


def test_sigterm_during_overwrite_keeps_the_old_output(tmp_path: Path) -> None:
    from loratools import merge

    out = tmp_path / "out"
    merge(LLAMA_BASE, [LLAMA_LORA], out)
    before = tree_digest(out)
    proc = _merge(out, tmp_path, "--overwrite", "--weights", "0.5")
    tmp = _wait_for_written_temporary(tmp_path, "out", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=EXIT_BOUND_S) == 128 + signal.SIGTERM
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert tree_digest(out) == before
