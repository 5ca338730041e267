"""The hang-and-memory class of issue 19 §3 in a child process: every command on a 1M-entry safetensors header,
2 GiB torch.save bombs, a sparse 2 GiB adapter tensor and OFT/BOFT configs asking for 1e9 Neumann terms or 10⁶
butterfly factors ends as its case says, and the child's peak RSS stays within 1 GB (only a generous hang
guard: no timing assertion)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEMORY_CASES = (
    "files-st-1m-empty-entries",
    "files-st-400k-tensors",
    "files-pickle-bomb-data-pkl",
    "files-pickle-bomb-storage",
    "files-sparse-2gib-nan",
    "families-oft-neumann-terms-huge",
    "families-boft-factor-huge",
    "families-boft-tensor-factors-huge",
)
CHILD = r"""
import json, sys, tempfile
from pathlib import Path
sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]
from hostile import all_cases
from reliability_support import invoke
wanted = set(json.loads(sys.argv[2]))
results = []
for case in (c for c in all_cases() if c.name in wanted):
    with tempfile.TemporaryDirectory() as tmp:
        path = case.build(Path(tmp))
        for command, argv in sorted(case.commands.items()):
            out = Path(tmp) / "out"
            code, stdout, stderr = invoke(*[path if a in ("A", "B") else out if a == "O" else a for a in argv])
            want = 1 if command.startswith("validate") and case.validate_exit == 1 else 2
            text = stdout + stderr
            results.append([case.name, command, code, want, "Traceback" in text, out.exists(), text[-300:]])
print("RESULTS " + json.dumps(results))
"""


def test_hostile_inputs_stay_within_a_gigabyte(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(HERE), json.dumps(MEMORY_CASES)],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
        cwd=tmp_path,
    )
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(line.removeprefix("RESULTS "))
    assert {r[0] for r in results} == set(MEMORY_CASES)
    for name, command, code, want, traceback, wrote, tail in results:
        assert code == want and not traceback and not wrote, (name, command, code, tail)
    assert peak_mb <= 1024, f"peak RSS {peak_mb:.0f} MB"
