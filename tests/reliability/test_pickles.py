"""No code from inputs: pickles that would create a file are refused before anything of theirs runs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from reliability_support import (
    LLAMA_BASE,
    LLAMA_LORA,
    PEFT_Q0,
    FileCreatingPickle,
    FileOpeningPickle,
    assert_one_line_error,
    invoke,
    tree_digest,
)

from loratools.checkpoint.reader import open_checkpoint
from loratools.errors import UnsafeInputError
from loratools.formats.adapter_io import load_adapter

PAYLOADS = {"os.system": FileCreatingPickle, "open": FileOpeningPickle}


def _hostile_adapter(root: Path, payload: str, legacy: bool = False) -> tuple[Path, Path]:
    """A PEFT folder whose adapter_model.bin would create ``marker`` when unpickled."""
    marker = root / f"PWNED-{payload}"
    folder = root / "adapter"
    folder.mkdir(parents=True)
    shutil.copy(LLAMA_LORA / "adapter_config.json", folder)
    state = {f"{PEFT_Q0}.lora_A.weight": torch.ones(4, 32), "extra": PAYLOADS[payload](marker)}
    if legacy:
        (folder / "adapter_model.bin").write_bytes(pickle.dumps(state, protocol=2))
    else:
        torch.save(state, folder / "adapter_model.bin")
    return folder, marker


def _hostile_base(root: Path, payload: str, sharded: bool = False) -> tuple[Path, Path]:
    """A base folder whose pytorch_model.bin (or a .bin shard) would create ``marker``."""
    marker = root / f"PWNED-base-{payload}"
    folder = root / "base"
    folder.mkdir(parents=True)
    shutil.copy(LLAMA_BASE / "config.json", folder)
    state = {"model.norm.weight": torch.ones(32), "lm_head.weight": PAYLOADS[payload](marker)}
    if sharded:
        torch.save(state, folder / "pytorch_model-00001-of-00001.bin")
        index = {"weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in state}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder, marker


def _why(message: str, hint: str | None) -> None:
    assert "could run code" in message or "may run code" in message, message
    assert "weights_only" not in message and "weights_only" not in (hint or ""), "never advise turning the guard off"
    assert hint is not None and "safetensors" in hint, hint


def test_payloads_really_create_the_file(tmp_path: Path) -> None:
    """The oracle: a plain pickle.load of the same payloads does create the marker."""
    for payload, cls in PAYLOADS.items():
        marker = tmp_path / f"oracle-{payload}"
        obj = pickle.loads(pickle.dumps(cls(marker)))
        if hasattr(obj, "close"):
            obj.close()
        assert marker.exists(), payload


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_adapter_bin_never_runs(tmp_path: Path, payload: str, legacy: bool) -> None:
    folder, marker = _hostile_adapter(tmp_path, payload, legacy)
    with pytest.raises(UnsafeInputError) as exc:
        load_adapter(folder)
    assert not marker.exists()
    _why(exc.value.message, exc.value.hint)
    if not legacy:
        assert "os.system" in exc.value.message or "posix.system" in exc.value.message or "open" in exc.value.message


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_base_bin_never_runs(tmp_path: Path, payload: str, sharded: bool) -> None:
    folder, marker = _hostile_base(tmp_path, payload, sharded)
    with pytest.raises(UnsafeInputError) as exc:
        with open_checkpoint(folder) as reader:
            reader.get("lm_head.weight")
    assert not marker.exists()
    _why(exc.value.message, exc.value.hint)


def test_bare_pickle_file_is_refused_with_a_reason(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    bare = tmp_path / "lora.pt"
    torch.save({"x": FileCreatingPickle(marker)}, bare)
    code, out, err = invoke("info", bare)
    assert_one_line_error(code, out, err, "a bare pickle file is not read")
    assert "safetensors" in err and not marker.exists()


def test_every_command_refuses_hostile_inputs(tmp_path: Path) -> None:
    """Through the CLI: each command that reads an adapter or a base; nothing created, inputs unchanged."""
    adapter, a_marker = _hostile_adapter(tmp_path / "a", "os.system")
    base, b_marker = _hostile_base(tmp_path / "b", "open")
    before = {**tree_digest(adapter), **tree_digest(base)}
    out = tmp_path / "out"
    runs = [
        ("info", adapter),
        ("validate", adapter),
        ("spectrum", adapter),
        ("resize", adapter, "--rank", "2", "-o", out),
        ("rescale", adapter, "--scale", "2", "-o", out),
        ("convert", adapter, "--to", "peft", "-o", out),
        ("combine", adapter, LLAMA_LORA, "-o", out),
        ("diff", LLAMA_LORA, adapter),
        ("merge", LLAMA_BASE, adapter, "-o", out),
        ("merge", base, LLAMA_LORA, "-o", out),
        ("validate", LLAMA_LORA, "--base", base),
        ("extract", base, LLAMA_BASE, "--rank", "2", "-o", out),
        ("extract", LLAMA_BASE, base, "--rank", "2", "-o", out),
    ]
    for args in runs:
        code, stdout, stderr = invoke(*args)
        assert_one_line_error(code, stdout, stderr, "refused to load: the pickle calls")
        assert "safetensors" in stderr, args
        assert not a_marker.exists() and not b_marker.exists(), args
        assert not out.exists(), args
    assert {**tree_digest(adapter), **tree_digest(base)} == before
