"""llama.cpp's own runtime (libllama b11739 from PyPI's llama-cpp-py-sync wheel) as a test oracle.

The runtime lives in a virtualenv of its own, made by ``../shared/tools/llama_cpp_runtime/setup.sh VENV``
(.ci/run makes ``.venv-llama``); ``lora_logits.py`` beside setup.sh prints a GGUF model's all-position logits
with or without a GGUF adapter (F32 KV cache, flash attention off). It runs as a subprocess: a GGML_ASSERT
aborts the process, and that is a finding, not a skip. Where the runtime is missing or cannot load on this
platform, the tests skip and say why. ``LORATOOLS_LLAMA_VENV`` / ``LORATOOLS_LLAMA_TOOLS`` override the paths.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
from models import run_cli  # noqa: E402, F401 - one CLI runner for every test folder

warnings.filterwarnings("ignore", category=FutureWarning)

VENV = Path(os.environ.get("LORATOOLS_LLAMA_VENV", ROOT / ".venv-llama"))
TOOLS = Path(os.environ.get("LORATOOLS_LLAMA_TOOLS", ROOT.parent / "shared" / "tools" / "llama_cpp_runtime"))
#: all-position logits of an f32 base: the runtime's own float32 rounding against PEFT's is ~1e-6
TOL = 1e-4
#: token ids the logits are taken at (one sequence, every position)
TOKENS = [1, 17, 200, 5, 63, 311, 2, 140, 77, 250, 9, 33]


@functools.cache
def runtime_problem() -> str | None:
    """Why the runtime cannot run here, or None when it loads."""
    py, script = VENV / "bin" / "python", TOOLS / "lora_logits.py"
    if not py.exists():
        return f"no llama.cpp runtime venv at {VENV} (make it: {TOOLS}/setup.sh {VENV})"
    if not script.exists():
        return f"no {script}"
    probe = "from llama_cpp_py_sync._cffi_bindings import get_lib; get_lib().llama_backend_init()"
    r = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return f"the llama.cpp runtime in {VENV} does not load on this platform: {r.stderr.strip()[-400:]}"
    return None


@pytest.fixture(scope="session")
def runtime() -> None:
    why = runtime_problem()
    if why:
        pytest.skip(why)


@dataclass
class RunResult:
    """One run of lora_logits.py: logits (positions, vocab) or the failure (exit code, stderr)."""

    logits: np.ndarray | None
    returncode: int
    stderr: str

    def ok(self) -> np.ndarray:
        assert self.logits is not None, f"llama.cpp runtime failed (exit {self.returncode}): {self.stderr[-2000:]}"
        return self.logits


def run_logits(model: Path, adapter: Path | None = None, tokens: list[int] = TOKENS) -> RunResult:
    """All-position logits of ``model`` (+ ``adapter`` at scale 1) from llama.cpp, as a subprocess."""
    work = model.parent
    tag = f"{model.stem}-{adapter.stem if adapter else 'base'}"
    tok, out = work / f"{tag}.tokens.json", work / f"{tag}.npy"
    tok.write_text(json.dumps(tokens))
    out.unlink(missing_ok=True)
    args = [str(VENV / "bin" / "python"), str(TOOLS / "lora_logits.py"), str(model)]
    args += [str(adapter)] if adapter else []
    r = subprocess.run([*args, str(tok), str(out)], capture_output=True, text=True, timeout=600)
    logits = np.load(out) if r.returncode == 0 and out.exists() else None
    return RunResult(logits, r.returncode, r.stderr)


def hf_logits(model: torch.nn.Module, tokens: list[int] = TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def assert_merged_runs_like_peft(case: Any, adapter: Path, out: Path, *extra: str) -> None:
    """``loratools merge case.gguf adapter -o out`` runs in llama.cpp within ``case.tol`` of PEFT's logits
    (``case.want``), where the adapter moves them by more than 50 tolerances (``case.effect``)."""
    code, _, err = run_cli(["merge", case.gguf, adapter, "-o", out, "--overwrite", *extra])
    assert code == 0, err
    diff = max_diff(run_logits(out).ok(), case.want)
    assert case.effect > 50 * case.tol, case.effect
    assert diff < case.tol, f"{case.arch}: {diff} off PEFT (base noise {case.noise}, effect {case.effect})"


#: special tokens some vocab loaders look up by text (Phi-3's end of turn)
SPECIAL = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


@functools.cache
def tokenizer(vocab_size: int) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE with exactly ``vocab_size`` tokens, trained with the
    ``tokenizers`` package on seeded words: what a GGUF model needs to load (the tests feed token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=int(rng.integers(2, 8)))) for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL,
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(words[i : i + 20]) for i in range(0, len(words), 20)], trainer)
    data = json.loads(tok.to_str())["model"]
    vocab = sorted(data["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert len(tokens) == vocab_size, len(tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["merges"]]
    return tokens, merges
