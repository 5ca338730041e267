"""A stranger's walk-through (issue 21, the UX items): ``info`` on what is not an adapter (a GGUF or safetensors base,
a merge output), the units ``convert`` and ``merge`` count in, and ``| head -1``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from foundation_support import ROOT
from safetensors.torch import save_file

from loratools.cli.main import cli


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _wide_peft(folder: Path, modules: int = 8000) -> Path:
    """A PEFT adapter whose ``info`` output is ten times a pipe's buffer (64 KiB): ``head`` leaves mid-write."""
    folder.mkdir()
    tensors = {}
    for i in range(modules):
        stem = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{stem}.lora_A.weight"] = torch.full((1, 2), 0.1)
        tensors[f"{stem}.lora_B.weight"] = torch.full((2, 1), 0.1)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_head_closes_the_pipe_quietly(tmp_path: Path) -> None:
    """`loratools info X | head -1`: the first line, nothing on stderr, exit 0 (was exit 1, BrokenPipeError)."""
    adapter = _wide_peft(tmp_path / "wide")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for extra in ([], ["--json"]):  # the table, and one JSON object
        line = " ".join([sys.executable, "-m", "loratools", "info", str(adapter), *extra])
        proc = subprocess.run(
            ["bash", "-c", f"{line} 2>{tmp_path / 'err'} | head -1; exit ${{PIPESTATUS[0]}}"],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        stderr = (tmp_path / "err").read_text()
        assert proc.returncode == 0, stderr
        assert proc.stdout.count("\n") == 1 and proc.stdout.strip(), proc.stdout
        assert "Error" not in stderr and "Traceback" not in stderr and "Exception" not in stderr, stderr
