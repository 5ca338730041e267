"""Determinism across processes and atomicity under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from merge_support import make_case

from loratools import merge, verify
from loratools.files.safetensors_file import read_header
from loratools.publishing.publish import read_provenance


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loratools", *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_processes_are_byte_identical(tmp_path: Path) -> None:
    c = make_case(tmp_path, "llama", base_kw={"dtype": torch.bfloat16, "max_shard_size": "20KB"})
    runs = []
    for i in (1, 2):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        runs.append(_cli(["merge", c.base, c.adapter, "-o", f"out-{i}", "--max-shard-size", "30KB"], cwd))
    for p in runs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    a, b = _files(tmp_path / "cwd1" / "out-1"), _files(tmp_path / "cwd2" / "out-2")
    assert a == b and len(a) > 3
    first = sorted((tmp_path / "cwd1" / "out-1").glob("model-00001-of-*.safetensors"))[0]
    header_meta = read_header(first)[1]
    assert read_provenance(header_meta)["operation"] == "merge"


def test_sigkill_leaves_nothing_finished_and_rerun_succeeds(tmp_path: Path) -> None:
    c = make_case(tmp_path, "llama", base_kw={"max_shard_size": "20KB"})
    out = tmp_path / "merged"
    p = _cli(["merge", c.base, c.adapter, "-o", out], tmp_path, {"LORATOOLS_MERGE_TEST_PAUSE": "30"})
    deadline = time.time() + 600  # a generous bound: a loaded machine starts Python slowly
    tmp = None
    while time.time() < deadline and tmp is None:
        for d in tmp_path.iterdir():
            if d.name.startswith(".merged.loratools-tmp-") and any(d.glob("*.safetensors")):
                tmp = d
        time.sleep(0.1)
    assert tmp is not None, "the merge never wrote a shard"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=600)
    assert not out.exists()
    merge(c.base, [c.adapter], out)
    assert not tmp.exists(), "the stale temporary was not cleaned"
    assert verify(out, c.base, [c.adapter]).verified
