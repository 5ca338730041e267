"""A file system (FAT32: 4 GB per file) or `ulimit -f` that refuses a file this large (EFBIG), met mid-merge by the
writer thread: one line naming the output and the limit, nothing published, no temporary left (it was
"Error: OSError: [Errno 27] File too large", and an internal error where safetensors' own writer met it: resize,
extract). A real kernel limit (RLIMIT_FSIZE), not a mock. ENOSPC takes the same paths (write_errors maps both)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_support import FIXTURES, LLAMA_BASE, LLAMA_LORA, ROOT

COMMANDS = {
    "merge": ["merge", LLAMA_BASE, LLAMA_LORA],  # the merge's writer thread, O_DIRECT
    "resize": ["resize", LLAMA_LORA, "--rank", "2"],  # safetensors' save_file
    "extract": ["extract", LLAMA_BASE, FIXTURES / "bases" / "llama-tuned", "--rank", "4"],
}


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 10, 4 << 10))  # every output here is larger
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then the write fails with EFBIG instead of killing us


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_file_size_limit_mid_write_is_one_line(tmp_path: Path, command: str) -> None:
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "loratools", *map(str, COMMANDS[command]), "-o", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=_limited,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "OSError" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[0] == (
        f"Error: {out}: cannot write the output: a file is larger than the file system of {tmp_path} "
        "(or the shell's `ulimit -f`) allows; nothing was published"
    )
    assert "FAT32" in r.stderr
    assert sorted(os.listdir(tmp_path)) == []  # nothing published, no temporary
