"""Helpers shared by the reliability tests (a uniquely named module: every folder's conftest is 'conftest')."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
BROKEN = FIXTURES / "broken"
LLAMA_BASE = FIXTURES / "bases" / "llama"
LLAMA_LORA = FIXTURES / "peft" / "llama-lora"
Q0 = "model.layers.0.self_attn.q_proj"
PEFT_Q0 = f"base_model.model.{Q0}"


def invoke(*args: object) -> tuple[int, str, str]:
    """Run the CLI in process (the group holds the error boundary): ``(exit code, stdout, stderr)``."""
    from loratools.cli.main import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def assert_one_line_error(code: int, out: str, err: str, message: str, exit_code: int = 2) -> None:
    """Exit ``exit_code``, exactly one ``Error:`` line holding ``message`` on stderr, no traceback."""
    text = out + err
    assert code == exit_code, text
    assert "Traceback" not in text, text
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, err
    assert message in errors[0], (message, errors[0])


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), by relative name."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def leftovers(folder: Path, stem: str) -> list[str]:
    """Anything named after output ``stem`` in ``folder``: the output itself or its temporaries."""
    return sorted(p.name for p in folder.iterdir() if p.name == stem or p.name.startswith(f".{stem}."))


def damaged_adapter(dst: Path, edit: Callable[[dict[str, torch.Tensor]], None], src: Path = LLAMA_LORA) -> Path:
    """A copy of ``src`` (a PEFT folder) whose tensors ``edit`` changed in place."""
    import shutil

    from safetensors.torch import save_file

    from loratools.files.safetensors_file import load_file

    shutil.copytree(src, dst)
    tensors, meta = load_file(dst / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata=meta)
    return dst


class FileCreatingPickle:
    """Unpickling this runs ``os.system('touch MARKER')``: proof that a loader ran pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


class FileOpeningPickle:
    """Unpickling this runs ``open(MARKER, 'w')``, which creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))
