"""Interrupted runs and output safety: stale temporaries cleaned, --overwrite required, inputs never written."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from reliability_support import LLAMA_BASE, LLAMA_LORA, assert_one_line_error, invoke, tree_digest

WRITERS = {
    "merge": lambda o: ("merge", LLAMA_BASE, LLAMA_LORA, "-o", o),
    "resize": lambda o: ("resize", LLAMA_LORA, "--rank", "2", "-o", o),
    "rescale": lambda o: ("rescale", LLAMA_LORA, "--scale", "0.5", "-o", o),
    "combine": lambda o: ("combine", LLAMA_LORA, LLAMA_LORA, "-o", o),
    "convert": lambda o: ("convert", LLAMA_LORA, "--to", "peft", "-o", o),
    "extract": lambda o: ("extract", LLAMA_BASE, LLAMA_BASE.parent / "llama-tuned", "--rank", "2", "-o", o),
}


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_stale_temporaries_of_killed_runs_are_cleaned(tmp_path: Path, command: str) -> None:
    out = tmp_path / "out"
    dead = tmp_path / f".out.loratools-tmp-{_dead_pid()}-deadbeef"
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    old = tmp_path / f".out.loratools-old-{_dead_pid()}-0badf00d"
    old.write_bytes(b"an output moved aside by a killed --overwrite")
    live = tmp_path / f".out.loratools-tmp-{os.getpid()}-cafecafe"  # a run still in progress: left alone
    live.mkdir()
    code, _, err = invoke(*WRITERS[command](out))
    assert code == 0, err
    assert not dead.exists() and not old.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_existing_output_needs_overwrite(tmp_path: Path, command: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, stdout, err = invoke(*WRITERS[command](out))
    assert_one_line_error(code, stdout, err, f"{out} exists already")
    assert "--overwrite" in err and (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    code, stdout, err = invoke(*WRITERS[command](out), "--overwrite")  # not ours: never deleted
    assert_one_line_error(code, stdout, err, "is not a previous loratools output")
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    out.rmdir()
    code, _, err = invoke(*WRITERS[command](out))
    assert code == 0, err
    before = sorted(tree_digest(out))
    code, _, err = invoke(*WRITERS[command](out), "--overwrite")  # a previous output of ours is replaced
    assert code == 0, err
    assert sorted(tree_digest(out)) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["itself", "inside", "symlink", "single-file"])
def test_merge_onto_its_own_base_is_refused(base_copy: Path, tmp_path: Path, where: str) -> None:
    before = tree_digest(base_copy)
    if where == "itself":
        target = base_copy
    elif where == "inside":
        target = base_copy / "merged"
    elif where == "symlink":
        target = tmp_path / "link"
        target.symlink_to(base_copy, target_is_directory=True)
    else:
        target = base_copy / "model.safetensors"
    src = base_copy / "model.safetensors" if where == "single-file" else base_copy
    for extra in ((), ("--overwrite",)):
        code, out, err = invoke("merge", src, LLAMA_LORA, "-o", target, *extra)
        assert_one_line_error(code, out, err, "the output would overwrite or sit inside the input")
    assert tree_digest(base_copy) == before
    assert sorted(p.name for p in base_copy.iterdir()) == sorted(p.name for p in LLAMA_BASE.iterdir())


@pytest.mark.parametrize("command", ["resize", "rescale", "convert"])
def test_adapter_commands_never_write_onto_their_input(adapter_copy: Path, command: str) -> None:
    before = tree_digest(adapter_copy)
    args = [adapter_copy if a == LLAMA_LORA else a for a in WRITERS[command](adapter_copy)]
    code, out, err = invoke(*args, "--overwrite")
    assert_one_line_error(code, out, err, "the output would overwrite or sit inside the input")
    assert tree_digest(adapter_copy) == before


def test_a_failed_overwrite_keeps_the_old_output(tmp_path: Path) -> None:
    """An error after the preflight (a NaN adapter) leaves the previous output exactly as it was."""
    out = tmp_path / "out"
    code, _, err = invoke("resize", LLAMA_LORA, "--rank", "2", "-o", out)
    assert code == 0, err
    before = tree_digest(out)
    bad = tmp_path / "bad"
    shutil.copytree(LLAMA_LORA, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00")
    code, stdout, err = invoke("resize", bad, "--rank", "2", "-o", out, "--overwrite")
    assert code == 2 and tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]
