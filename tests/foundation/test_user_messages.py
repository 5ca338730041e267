"""Messages a user meets (issue 19.4): each one line that names the thing and says what to do.

Read-only and full file systems are real ones: a tmpfs of 64 KiB and a read-only bind mount made in a
private user and mount namespace (``unshare``; root ignores chmod, so a chmod'd folder would not do).
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from foundation_support import ROOT, adapter_dir, base_dir

from loratools.errors import DiskSpaceError, OutputWriteError
from loratools.publishing.write_errors import describe

GGUF_BASE = ROOT / "fixtures" / "gguf" / "llama-f32.gguf"  # 90 KB: a merged copy cannot fit in 64 KiB


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_work(), reason="unshare of user+mount namespaces refused")


def _in_small_mounts(mnt: Path, *commands: list) -> list[subprocess.CompletedProcess]:
    """Run loratools commands with ``mnt`` a 64 KiB tmpfs and ``mnt/ro`` a read-only bind of a folder in it.

    One namespace for all commands; each prints its exit status and streams between markers."""
    mnt.mkdir()
    lines = [f"mount -t tmpfs -o size=64k tmpfs {mnt}", f"mkdir {mnt}/ro", f"mount --bind -o ro {mnt}/ro {mnt}/ro"]
    for i, args in enumerate(commands):
        cmd = shlex.join([sys.executable, "-m", "loratools", *map(str, args)])
        lines.append(f"{cmd} >{mnt}.out{i} 2>{mnt}.err{i}; echo $? >{mnt}.rc{i}")
    lines.append(f"ls -A {mnt} {mnt}/ro > {mnt}.ls")
    script = " && ".join(lines[:3]) + "; " + "; ".join(lines[3:])
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0
    results = []
    for i, args in enumerate(commands):
        rc = int(Path(f"{mnt}.rc{i}").read_text())
        out, err = Path(f"{mnt}.out{i}").read_text(), Path(f"{mnt}.err{i}").read_text()
        results.append(subprocess.CompletedProcess(args, rc, out, err))
    return results


def _one_line(result: subprocess.CompletedProcess) -> tuple[str, str]:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: "), result.stderr
    assert "Traceback" not in result.stderr and "OSError" not in result.stderr
    assert "loratools-tmp" not in result.stderr  # the user named -o OUT, not our temporary
    return lines[0], lines[1]


@needs_namespaces
def test_read_only_and_full_file_systems(tmp_path) -> None:
    mnt = tmp_path / "mnt"
    lora = adapter_dir("llama-lora")
    full, ro_file, ro_nested, ro_folder, ro_json = _in_small_mounts(
        mnt,
        ["merge", GGUF_BASE, lora, "-o", mnt / "merged.gguf"],  # no space estimate on this path: it fills up
        ["convert", lora, "--to", "kohya", "-o", mnt / "ro" / "k.safetensors"],
        ["convert", lora, "--to", "kohya", "-o", mnt / "ro" / "new" / "k.safetensors"],
        ["rescale", lora, "--scale", "2", "-o", mnt / "ro" / "half"],  # refused before the space check
        ["merge", base_dir("llama"), lora, "-o", mnt / "ro" / "m", "--json"],
    )
    error, hint = _one_line(full)
    assert error.startswith(f"Error: {mnt / 'merged.gguf'}: the disk filled up while writing the output")
    assert "nothing was published" in error and "free some space" in hint
    for result, out in ((ro_file, "k.safetensors"), (ro_nested, "new/k.safetensors"), (ro_folder, "half")):
        error, hint = _one_line(result)
        assert error == (
            f"Error: {mnt / 'ro' / out}: cannot write the output: {mnt / 'ro'} is on a read-only file system; "
            "nothing was published"
        )
        assert "writable folder" in hint
    import json

    assert json.loads(ro_json.stdout)["error"]["type"] == "OutputWriteError" and ro_json.returncode == 2
    assert (tmp_path / "mnt.ls").read_text().split() == [f"{mnt}:", "ro", f"{mnt}/ro:"]  # nothing left behind


def test_mapping_of_real_os_errors(tmp_path) -> None:
    """Without namespaces too: OS errors the kernel really raised, mapped for the output they concern."""
    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb") as f:  # every write there fails with ENOSPC
            f.write(b"x")
            f.flush()
    assert full.value.errno == errno.ENOSPC
    mapped = describe(full.value, tmp_path / "out")
    assert isinstance(mapped, DiskSpaceError) and mapped.message.startswith(f"{tmp_path / 'out'}: the disk filled")
    target = Path("/sys/kernel/loratools-out.safetensors")
    with pytest.raises(OSError) as sysfs:
        open(target, "wb")  # sysfs takes no new files, also not from root (EACCES, or EROFS where mounted ro)
    mapped = describe(sysfs.value, target)
    assert isinstance(mapped, OutputWriteError) and mapped.errno == sysfs.value.errno
    assert mapped.message.startswith(f"{target}: cannot write the output: ")
    unrelated = OSError(errno.EACCES, "Permission denied", str(tmp_path / "some-input"))
    assert describe(unrelated, tmp_path / "out") is None  # an input's error stays about the input
