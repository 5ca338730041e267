"""Resource bounds: headers, JSON files and shapes are checked before anything is allocated."""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from reliability_support import BROKEN, LLAMA_BASE, LLAMA_LORA, PEFT_Q0, Q0, damaged_adapter

import loratools.files.json_file as json_file_mod
import loratools.files.safetensors_file as st_mod
from loratools.checkpoint.reader import open_checkpoint
from loratools.errors import FormatError, LoratoolsError, UnsafeInputError, ValidationError
from loratools.files.safetensors_file import SafetensorsFile, read_header
from loratools.formats.adapter_io import load_adapter
from loratools.ops.validate import validate

FIXTURES_SHARDED = LLAMA_BASE.parent / "llama-sharded"


def _st(path: Path, header: dict, data_len: int, claimed: int | None = None) -> Path:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb) if claimed is None else claimed) + hb)
        f.truncate(8 + len(hb) + data_len)  # sparse: no disk used
    return path


def _peak(fn) -> int:  # noqa: ANN001
    tracemalloc.start()
    try:
        fn()
    except LoratoolsError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_huge_header_claim_is_refused_before_reading(tmp_path: Path) -> None:
    p = _st(tmp_path / "a.safetensors", {}, 0, claimed=st_mod.MAX_HEADER_BYTES + 1)
    with pytest.raises(UnsafeInputError, match="limit"):
        read_header(p)
    assert _peak(lambda: read_header(p)) < 64 * 1024


def test_header_cap_is_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(100)}
    p = _st(tmp_path / "a.safetensors", header, 400)
    assert len(read_header(p)[0]) == 100
    monkeypatch.setattr(st_mod, "MAX_HEADER_BYTES", 1024)
    with pytest.raises(UnsafeInputError, match=r"header claims \d+ bytes \(limit 1024\)"):
        read_header(p)


def test_reading_a_header_allocates_only_the_header(tmp_path: Path) -> None:
    """A 4 GiB tensor (sparse file): the header is read, validated and mapped without touching the data."""
    n = 1 << 30
    p = _st(tmp_path / "big.safetensors", {"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}, 4 * n)
    peak = _peak(lambda: SafetensorsFile(p).info("w"))
    assert peak < 256 * 1024, peak
    # a shape whose bytes the file does not hold is refused from the header alone
    q = _st(tmp_path / "lie.safetensors", {"w": {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 64]}}, 64)
    with pytest.raises(FormatError, match=r"tensor 'w': shape \[1073741824, 1073741824\] of F32 needs"):
        SafetensorsFile(q)
    assert _peak(lambda: SafetensorsFile(q)) < 256 * 1024


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "shape": [2] * 9, "data_offsets": [0, 2048]}, "invalid shape"),
        ({"dtype": "F32", "shape": [1 << 50], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "lies outside the file"),
        ({"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype 'Q4_K'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "lies outside the file"),
        ([1, 2], "is not an object"),
    ],
)
def test_header_entries_name_file_and_tensor(tmp_path: Path, entry: object, message: str) -> None:
    p = _st(tmp_path / "x.safetensors", {"lora.weight": entry}, 64)
    with pytest.raises(FormatError) as exc:
        read_header(p)
    assert str(p) in exc.value.message and "'lora.weight'" in exc.value.message and message in exc.value.message


@pytest.mark.parametrize("which", ["adapter_config.json", "config.json", "model.safetensors.index.json"])
def test_json_files_are_size_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    adapter, base = tmp_path / "adapter", tmp_path / "base"
    shutil.copytree(LLAMA_LORA, adapter)
    shutil.copytree(FIXTURES_SHARDED, base)
    monkeypatch.setattr(json_file_mod, "MAX_JSON_BYTES", 4096)
    target = adapter / which if which == "adapter_config.json" else base / which
    target.write_text(target.read_text() + " " * 8192)
    with pytest.raises(UnsafeInputError, match=r"of \d+ bytes exceeds the 4096 byte limit") as exc:
        load_adapter(adapter) if which == "adapter_config.json" else open_checkpoint(base)
    assert str(target) in exc.value.message


def test_pipeline_index_is_size_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}) + " " * 9000)
    monkeypatch.setattr(json_file_mod, "MAX_JSON_BYTES", 4096)
    with pytest.raises(UnsafeInputError, match="model_index.json"):
        open_checkpoint(tmp_path)


def test_int_factors_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    bad = damaged_adapter(
        tmp_path / "int",
        lambda t: t.update({f"{PEFT_Q0}.lora_B.weight": t[f"{PEFT_Q0}.lora_B.weight"].to(torch.int16)}),
    )
    with pytest.raises(ValidationError) as exc:
        load_adapter(bad)
    msg = exc.value.message
    assert "adapter_model.safetensors" in msg and f"{Q0}.lora_B is int16" in msg and "floating point" in msg
    report = validate(bad)
    assert report.exit_code == 1 and [f.code for f in report.errors] == ["dtype"]


def test_rank_larger_than_the_matrix_is_reported_by_validate(tmp_path: Path) -> None:
    report = validate(BROKEN / "rank-exceeds-matrix")
    found = [f for f in report.errors if f.code == "rank_exceeds_matrix"]
    assert report.exit_code == 1 and len(found) == 2
    f = found[0]
    assert f.file.endswith("adapter_model.safetensors") and f.tensor.endswith("q_proj.lora_A")
    assert "rank 40 exceeds its 32x32 matrix" in f.message and "resize" in f.hint


def test_base_with_absurd_shape_names_file_and_tensor(tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(LLAMA_BASE, base)
    tensors, _ = read_header(base / "model.safetensors")
    raw = (base / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [1 << 40]
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    (base / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    with pytest.raises(FormatError) as exc:
        open_checkpoint(base)
    assert "model.safetensors" in exc.value.message and "'model.norm.weight'" in exc.value.message


@pytest.mark.parametrize(
    "field, value",
    [("r", "Infinity"), ("lora_alpha", "NaN"), ("lora_alpha", "-Infinity"), ("alpha_pattern", '{"q_proj": Infinity}')],
)
def test_non_finite_config_numbers_are_refused(tmp_path: Path, field: str, value: str) -> None:
    """JSON's Infinity/NaN in a PEFT config is a FormatError naming the key (found by fuzzing: int(inf))."""
    import json
    import re
    import shutil

    from loratools.errors import FormatError
    from loratools.formats.adapter_io import load_adapter

    src = Path(__file__).resolve().parents[2] / "fixtures" / "peft" / "llama-lora"
    dst = tmp_path / "adapter"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg[field] = "__PLACEHOLDER__"
    text = json.dumps(cfg).replace('"__PLACEHOLDER__"', value)
    (dst / "adapter_config.json").write_text(text)
    with pytest.raises(FormatError, match=re.escape("finite number")):
        load_adapter(dst)
