"""The broken-input corpus (fixtures/broken) through every command that reads adapters or bases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_support import BROKEN, LLAMA_BASE, LLAMA_LORA, ROOT, assert_one_line_error, invoke, tree_digest

EXPECTED = json.loads((BROKEN / "EXPECTED.json").read_text())
ADAPTERS = sorted(k for k, v in EXPECTED.items() if v["kind"] == "adapter")
BASES = sorted(k for k, v in EXPECTED.items() if v["kind"] == "base")

#: command -> argv with the broken adapter at A (and the output at O)
ADAPTER_COMMANDS = {
    "info": ["info", "A"],
    "info-base": ["info", "A", "--base", LLAMA_BASE],
    "validate": ["validate", "A"],
    "spectrum": ["spectrum", "A"],
    "diff": ["diff", LLAMA_LORA, "A"],
    "resize": ["resize", "A", "--rank", "1", "-o", "O"],
    "rescale": ["rescale", "A", "--scale", "2", "-o", "O"],
    "convert": ["convert", "A", "--to", "peft", "-o", "O"],
    "combine": ["combine", LLAMA_LORA, "A", "-o", "O"],
    "merge": ["merge", LLAMA_BASE, "A", "-o", "O"],
    "verify": ["verify", LLAMA_BASE, "--base", LLAMA_BASE, "--adapter", "A"],
    "export-onnx": ["export-onnx", LLAMA_BASE, "--adapter", "A", "-o", "O", "--no-verify"],
}
#: command -> argv with the broken base at B
BASE_COMMANDS = {
    "merge": ["merge", "B", LLAMA_LORA, "-o", "O"],
    "validate": ["validate", LLAMA_LORA, "--base", "B"],
    "info": ["info", LLAMA_LORA, "--base", "B"],
    "extract-base": ["extract", "B", LLAMA_BASE, "--rank", "2", "-o", "O"],
    "extract-tuned": ["extract", LLAMA_BASE, "B", "--rank", "2", "-o", "O"],
    "verify": ["verify", LLAMA_BASE, "--base", "B", "--adapter", LLAMA_LORA],
    "convert": ["convert", LLAMA_LORA, "--to", "peft", "--base", "B", "-o", "O"],
    "diff": ["diff", LLAMA_LORA, LLAMA_LORA, "--base", "B"],
    "export-onnx": ["export-onnx", "B", "-o", "O", "--no-verify"],
}


@pytest.fixture(scope="module", autouse=True)
def corpus_unchanged():
    """No command writes into the corpus: every file is byte-identical after the whole module."""
    before = tree_digest(BROKEN)
    yield
    assert tree_digest(BROKEN) == before


def _check(entry: str, command: str, argv: list, out_dir: Path) -> None:
    spec = EXPECTED[entry]
    if "only" in spec and command.split("-")[0] not in spec["only"]:
        pytest.skip(f"{entry} is legal input for {command}")
    out = out_dir / "out"
    args = [BROKEN / entry if a in ("A", "B") else out if a == "O" else a for a in argv]
    code, stdout, stderr = invoke(*args)
    if command == "validate" and spec["validate_exit"] == 1:
        assert code == 1, stdout + stderr
        assert spec["message"] in stdout and "Traceback" not in stdout + stderr, stdout
    else:
        assert_one_line_error(code, stdout, stderr, spec["message"])
        assert stderr.count("\n") <= 2, stderr  # the error line and at most a hint
    assert list(out_dir.iterdir()) == [], sorted(p.name for p in out_dir.iterdir())


@pytest.mark.parametrize("command", sorted(ADAPTER_COMMANDS))
@pytest.mark.parametrize("entry", ADAPTERS)
def test_adapter_entry(entry: str, command: str, tmp_path: Path) -> None:
    _check(entry, command, ADAPTER_COMMANDS[command], tmp_path)


@pytest.mark.parametrize("command", sorted(BASE_COMMANDS))
@pytest.mark.parametrize("entry", BASES)
def test_base_entry(entry: str, command: str, tmp_path: Path) -> None:
    _check(entry, command, BASE_COMMANDS[command], tmp_path)


def test_expected_table_covers_the_corpus_and_the_generator_rebuilds_it(tmp_path: Path) -> None:
    on_disk = sorted(p.name for p in BROKEN.iterdir() if p.name not in ("EXPECTED.json", "make_broken.py"))
    assert on_disk == sorted(EXPECTED)
    for spec in EXPECTED.values():
        assert spec["kind"] in ("adapter", "base") and spec["message"] and spec["validate_exit"] in (1, 2)
    r = subprocess.run(
        [sys.executable, str(BROKEN / "make_broken.py"), str(tmp_path)], capture_output=True, timeout=600
    )
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads((tmp_path / "EXPECTED.json").read_text()) == EXPECTED
    fresh, committed = tree_digest(tmp_path), tree_digest(BROKEN)
    for name, digest in fresh.items():
        rel = name.split("/", 1)[1] if "/" in name else name
        if not rel.endswith(".bin") and f"broken/{rel}" in committed:  # torch.save archives hold a random id
            assert committed[f"broken/{rel}"] == digest, rel


#: a real process per exit code (each costs a Python + torch start; every entry x command runs in-process above)
SMOKE = [
    (["merge", BROKEN / "base-pickle", LLAMA_LORA, "-o", "OUT"], 2, "the pickle calls"),
    (["validate", BROKEN / "nan-factor"], 1, "NaN/Inf values"),
]


@pytest.mark.parametrize("argv, code, message", SMOKE, ids=[s[0][0] + "-" + Path(s[0][1]).name for s in SMOKE])
def test_real_subprocess(tmp_path: Path, argv: list, code: int, message: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LORATOOLS_DEBUG", None)
    args = [str(tmp_path / "out") if a == "OUT" else str(a) for a in argv]
    r = subprocess.run([sys.executable, "-m", "loratools", *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    if code == 2:
        assert r.stderr.startswith("Error: ") and message in r.stderr.splitlines()[0]
    else:
        assert message in r.stdout
    assert list(tmp_path.iterdir()) == []
