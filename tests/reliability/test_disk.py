"""Disk-space preflight: every writing command checks free space before writing, and leaves nothing."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from reliability_support import LLAMA_BASE, LLAMA_LORA, assert_one_line_error, invoke, leftovers

Usage = namedtuple("Usage", "total used free")

WRITERS = {
    "merge": lambda o: ("merge", LLAMA_BASE, LLAMA_LORA, "-o", o),
    "merge-single-file": lambda o: ("merge", LLAMA_BASE / "model.safetensors", LLAMA_LORA, "-o", f"{o}.safetensors"),
    "resize": lambda o: ("resize", LLAMA_LORA, "--rank", "2", "-o", o),
    "rescale": lambda o: ("rescale", LLAMA_LORA, "--scale", "0.5", "-o", o),
    "combine": lambda o: ("combine", LLAMA_LORA, LLAMA_LORA, "-o", o),
    "convert": lambda o: ("convert", LLAMA_LORA, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", o),
    "extract": lambda o: ("extract", LLAMA_BASE, LLAMA_BASE.parent / "llama-tuned", "--rank", "2", "-o", o),
    "spectrum-plot": lambda o: ("spectrum", LLAMA_LORA, "--plot", f"{o}.png"),
    "export-onnx": lambda o: ("export-onnx", LLAMA_BASE, "-o", o, "--no-verify"),
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_not_enough_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    if command == "spectrum-plot":
        pytest.importorskip("matplotlib")
    real = shutil.disk_usage
    asked: list[str] = []

    def tiny(path):  # noqa: ANN001, ANN202
        asked.append(str(path))
        return Usage(real(path).total, real(path).total, 100)

    monkeypatch.setattr("loratools.publishing.publish.shutil.disk_usage", tiny)
    code, out, err = invoke(*WRITERS[command](tmp_path / "out"))
    assert_one_line_error(code, out, err, "but only 100 B is free on")
    assert asked, "the command never asked for free space"
    assert [p for p in tmp_path.iterdir()] == [], sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("command", ["merge", "resize", "convert"])
def test_enough_space_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """The same commands run when the file system has room (the check is not just always failing)."""
    real = shutil.disk_usage
    monkeypatch.setattr("loratools.publishing.publish.shutil.disk_usage", lambda p: Usage(real(p).total, 0, 10**12))
    code, out, err = invoke(*WRITERS[command](tmp_path / "out"))
    assert code == 0, err
    assert leftovers(tmp_path, "out") == ["out"]
