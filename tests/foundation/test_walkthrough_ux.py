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


FIXTURES = ROOT / "fixtures"


def test_info_on_a_gguf_base_model_says_what_it_is_and_how_to_use_it() -> None:
    model = FIXTURES / "gguf" / "llama-q8_0.gguf"
    r = run("info", model)
    assert r.exit_code == 2, r.output  # as for every other input that is no adapter
    first, hint = r.output.splitlines()[:2]
    assert first.startswith(f"Error: {model} is a GGUF model (a base model), not a LoRA adapter: architecture llama, ")
    assert "21 tensors (Q8_0 ×14, F32 ×5, F16 ×2)" in first
    assert f"loratools merge {model} ADAPTER -o merged.gguf" in hint and "--to gguf --base" in hint
    d = json.loads(run("info", model, "--json").stdout)  # --json: the same as one error object
    assert d["ok"] is False and d["error"]["exit_code"] == 2 and "architecture llama" in d["error"]["message"]


def test_info_on_a_safetensors_base_says_what_it_is() -> None:
    bases = FIXTURES / "bases"
    for base, what in ((bases / "llama", "a llama model"),
                       (bases / "llama" / "model.safetensors", "a checkpoint (its architecture is not stated)"),
                       (bases / "llama-bnb-nf4", "a llama model")):  # fmt: skip
        r = run("info", base)
        assert r.exit_code == 2, r.output
        assert f"Error: {base} looks like a base model, not an adapter: {what}, 21 tensors (" in r.output, r.output
        assert f"loratools merge {base} ADAPTER -o OUT" in r.output
    assert "quantized (bnb-4bit)" in run("info", FIXTURES / "bases" / "llama-bnb-nf4").output


def test_an_unknown_lora_layout_is_not_called_a_base(tmp_path: Path) -> None:
    """A LoRA in a layout no reader takes keeps the "not a LoRA adapter in any known format" line."""
    path = tmp_path / "odd.safetensors"
    stem = "blocks.0.attn.lora1"
    save_file({f"{stem}.down.weight": torch.zeros(2, 4), f"{stem}.up.weight": torch.zeros(4, 2)}, path)
    r = run("info", path)
    assert r.exit_code == 2 and "not a LoRA adapter in any known format" in r.output and "base model" not in r.output


def test_info_on_a_gguf_merge_output_shows_its_provenance(tmp_path: Path) -> None:
    base, lora, out = FIXTURES / "gguf" / "llama-q8_0.gguf", FIXTURES / "peft" / "llama-lora", tmp_path / "m.gguf"
    assert run("merge", base, lora, "-o", out, "--weights", "0.5").exit_code == 0
    from loratools import __version__

    lines = run("info", out).output.splitlines()
    assert lines[1:] == [
        "kind          merged checkpoint (21 tensors)",
        f"base          {base}",
        "architecture  llama",
        f"merged        {lora} (weight 0.5)",
        f"made by       loratools {__version__} merge",
    ], lines
    d = json.loads(run("info", out, "--json").output)
    assert (d["kind"], d["base"], d["adapters"], d["weights"]) == ("merged checkpoint", str(base), [str(lora)], [0.5])



def test_convert_and_merge_name_the_units_they_count(tmp_path: Path) -> None:
    """A Qwen3-MoE adapter: 16 adapter modules (one per expert and parameter, as info counts) change 24 base tensors
    (gate_up_proj is gate_proj and up_proj on disk); convert said "16 modules", merge "24 modules"."""
    lora, base = FIXTURES / "moe" / "qwen3-moe-lora", FIXTURES / "moe" / "qwen3-moe-bf16"
    r = run("convert", lora, "--to", "vllm-moe", "-o", tmp_path / "v")
    assert r.output == f"wrote {tmp_path / 'v'} (vllm-moe, 16 adapter modules, from peft)\n"
    r = run("merge", base, lora, "-o", tmp_path / "m")
    assert r.output.startswith(f"merged into {tmp_path / 'm'}: 24 base tensors changed, "), r.output
    d = json.loads(run("merge", base, lora, "-o", tmp_path / "m2", "--json").output)
    assert (d["modules_merged"], d["tensors_changed"]) == (24, 24)  # the fields stay as they were
    assert json.loads(run("convert", lora, "--to", "vllm-moe", "-o", tmp_path / "v2", "--json").output)["modules"] == 16
    assert json.loads(run("info", lora, "--json").output)["num_modules"] == 16
