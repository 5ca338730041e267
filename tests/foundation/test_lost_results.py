"""Results lost silently (issue 19 section 2), through the CLI.

2.4: ``--overwrite`` replaces a single file only when it is a previous loratools output (our provenance
record in its safetensors/GGUF metadata, a PNG text chunk, a Modelfile comment), as folders already were;
a folder output named like a file (``merge FOLDER -o x.safetensors``) is refused.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from foundation_support import FIXTURES
from models import run_cli

PEFT = FIXTURES / "peft"
LLAMA = FIXTURES / "bases" / "llama"
LORA = PEFT / "llama-lora"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _writers(out: Path) -> dict[str, list]:
    """Commands that write one file at ``out`` (its suffix picks the format)."""
    return {
        "gguf": ["convert", LORA, "--to", "gguf", "--base", LLAMA, "-o", out],
        "kohya": ["convert", LORA, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", out],
        "onnx-adapter": ["convert", LORA, "--to", "onnx-adapter", "-o", out],
        "plot": ["spectrum", LORA, "--plot", out],
    }


def _foreign(kind: str, path: Path) -> Path:
    """A file loratools did not write, at ``path``."""
    if kind == "notes":
        path.write_text("my notes\n")
    elif kind == "transformers":
        shutil.copy(LLAMA / "model.safetensors", path)
    elif kind == "lycoris":
        shutil.copy(FIXTURES / "families" / "lycoris-loha.safetensors", path)
    elif kind == "gguf-model":
        shutil.copy(FIXTURES / "gguf" / "llama-f32.gguf", path)
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + bytes(17))
    return path


@pytest.mark.parametrize(
    ("writer", "foreign", "name"),
    [
        ("gguf", "notes", "notes.txt"),  # the issue's own example
        ("gguf", "gguf-model", "model.gguf"),
        ("kohya", "transformers", "model.safetensors"),
        ("kohya", "lycoris", "style.safetensors"),
        ("plot", "png", "holiday.png"),
    ],
)
def test_overwrite_refuses_a_file_loratools_did_not_write(writer, foreign, name, tmp_path: Path) -> None:  # noqa: ANN001
    target = _foreign(foreign, tmp_path / name)
    before = _digest(target)
    code, out, err = run_cli([*_writers(target)[writer], "--overwrite"])
    assert code == 2, out + err  # was: 0, the file replaced
    first = err.splitlines()[0]
    assert first.startswith(f"Error: refusing to replace {target}: it is not a previous loratools output"), err
    assert "Hint: write to a new path" in err
    assert _digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left


@pytest.mark.parametrize(("writer", "name"), [
    ("gguf", "a.gguf"), ("kohya", "a.safetensors"), ("onnx-adapter", "a.onnx_adapter"), ("plot", "a.png"),
])  # fmt: skip
def test_overwrite_replaces_our_own_file(writer: str, name: str, tmp_path: Path) -> None:
    target = tmp_path / name
    args = _writers(target)[writer]
    code, _, err = run_cli(args)
    assert code == 0, err
    code, _, err = run_cli(args)
    assert code == 2 and "exists already" in err
    code, _, err = run_cli([*args, "--overwrite"])
    assert code == 0, err


def test_ollama_modelfile_is_ours_to_replace_and_a_users_is_not(tmp_path: Path) -> None:
    out = tmp_path / "a.gguf"
    args = ["convert", LORA, "--to", "gguf", "--base", FIXTURES / "gguf" / "llama-f32.gguf", "-o", out, "--ollama"]
    assert run_cli(args)[0] == 0
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert lines[0].startswith("FROM ") and lines[1] == "ADAPTER ./a.gguf" and lines[2].startswith("# loratools {")
    code, _, err = run_cli([*args, "--overwrite"])
    assert code == 0, err
    (tmp_path / "Modelfile").write_text("FROM llama3\nSYSTEM you are my assistant\n")
    out.unlink()
    code, _, err = run_cli([*args, "--overwrite"])
    assert code == 2 and f"refusing to replace {tmp_path / 'Modelfile'}" in err, err
    assert "SYSTEM" in (tmp_path / "Modelfile").read_text()


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_a_folder_merge_named_like_a_file_is_refused(overwrite: tuple, tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    code, out, err = run_cli(["merge", LLAMA, LORA, "-o", target, *overwrite])
    assert code == 2, out + err  # was: a folder named x.safetensors
    assert err.startswith(f"Error: {target}: this output is a folder, but the name is that of a .safetensors file")
    assert "-o merged/" in err
    assert not list(tmp_path.iterdir())
