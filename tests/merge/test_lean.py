"""Adapter factors stay in their files during a merge, read one module at a time, and are still all
validated before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from merge_support import make_case
from safetensors.torch import save_file

from loratools.checkpoint.reader import open_checkpoint
from loratools.errors import NumericError
from loratools.files.safetensors_file import load_file
from loratools.formats.adapter_io import load_adapter
from loratools.formats.peft.format import PeftFormat
from loratools.ops.merge import factors as merge_factors
from loratools.ops.merge import merge


@pytest.fixture(scope="module")
def case(tmp_module: Path):
    return make_case(tmp_module / "case", "llama")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_factors_are_placeholders_read_back_exactly(case) -> None:  # noqa: ANN001
    reader = open_checkpoint(case.base)
    store = merge_factors.FactorStore()
    try:
        lean = merge_factors.load_lean(case.adapter, reader, store)
        held = load_adapter(case.adapter, base=reader)
        assert lean.modules.keys() == held.modules.keys() and lean.modules
        for name, m in lean.modules.items():
            assert m.down.is_meta and m.up.is_meta
            real = store.real(m)
            assert torch.equal(real.down, held.modules[name].down) and torch.equal(real.up, held.modules[name].up)
    finally:
        store.close()
        reader.close()


def test_lean_merge_equals_held_merge(case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    merge(case.base, [case.adapter], tmp_path / "lean", verify=True)
    monkeypatch.setattr(merge_factors, "LAZY_MIN_BYTES", 1 << 60)
    merge(case.base, [case.adapter], tmp_path / "held")
    assert _files(tmp_path / "lean") == _files(tmp_path / "held")


def test_reader_that_needs_the_data_falls_back(case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    original = PeftFormat.read.__func__

    def touching(cls, path, base=None):  # noqa: ANN001, ANN202
        adapter = original(cls, path, base)
        float(next(iter(adapter.modules.values())).down.sum())  # fails on a placeholder
        return adapter

    monkeypatch.setattr(PeftFormat, "read", classmethod(touching))
    merge(case.base, [case.adapter], tmp_path / "fallback")
    monkeypatch.undo()
    merge(case.base, [case.adapter], tmp_path / "lean")
    assert _files(tmp_path / "fallback") == _files(tmp_path / "lean")


def test_nan_in_the_last_module_stops_before_writing(case, tmp_path: Path) -> None:  # noqa: ANN001
    bad = tmp_path / "nan"
    shutil.copytree(case.adapter, bad)
    tensors, meta = load_file(bad / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_A" in k)[-1]
    tensors[key][-1, -1] = float("inf")
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata=meta)
    out = tmp_path / "out"
    with pytest.raises(NumericError, match="NaN/Inf"):
        merge(case.base, [case.adapter, bad], out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["nan"]
