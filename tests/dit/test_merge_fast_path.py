"""The merge's fast path for 2-D weights (issue 21 benchmark): the base read from a map of its file into the fp32
row blocks, the finite check done on the blocks in cache (ops/merge/apply.py FiniteCheck), the run's halves on two
threads, and the output written with O_DIRECT through an aligned staging buffer (checkpoint/writer.py). Same bytes
as before; the checks still refuse what the writer's sum refused."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import merge
from loratools.checkpoint import direct_io as D
from loratools.checkpoint import writer as W
from loratools.errors import NumericError
from loratools.ops.merge import apply, pipeline, stacked


def test_finite_check_edges() -> None:
    big = apply._BF16_OVERFLOW
    assert torch.tensor(big).view(torch.int32).item() == 0x7F7F8000
    below = float(torch.tensor(big).view(torch.int32).sub(1).view(torch.float32))
    for value, ok in ((1.0, True), (3.0e38, True), (below, True), (big, False), (-big, False)):
        check = apply.FiniteCheck(torch.bfloat16)
        check.see(torch.tensor([[0.5, value]]))
        assert check.ok is ok, value
        assert torch.tensor(value).bfloat16().isfinite().item() is ok  # the rounding the check predicts
    for value in (float("nan"), float("inf")):
        check = apply.FiniteCheck(torch.float32)
        check.see(torch.tensor([[value, 1.0]]))
        assert not check.ok
    assert not apply.FiniteCheck(torch.float16).ok  # fp16 keeps its own checks


def _files(tmp_path, value=None, at=(0, 0)):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 40, generator=g) * 0.02).bfloat16()
    if value is not None:
        w[at] = value
    base = tmp_path / "base.safetensors"
    save_file({"blocks.0.proj.weight": w, "blocks.0.proj.bias": torch.zeros(96).bfloat16()}, str(base))
    lora = tmp_path / "lora.safetensors"
    save_file(
        {
            "lora_unet_blocks_0_proj.lora_down.weight": torch.rand(4, 40, generator=g).bfloat16(),  # ΔW > 0
            "lora_unet_blocks_0_proj.lora_up.weight": torch.rand(96, 4, generator=g).bfloat16(),
            "lora_unet_blocks_0_proj.alpha": torch.tensor(2.0),
        },
        str(lora),
    )
    return base, lora


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3.3895e38])
def test_non_finite_results_are_refused(tmp_path, monkeypatch, value) -> None:  # noqa: ANN001
    monkeypatch.setattr(apply, "BLOCK_ELEMENTS", 160)  # 4 rows per block, several runs and halves
    monkeypatch.setattr(stacked, "RUN_BYTES", 40 * 2 * 16)
    base, lora = _files(tmp_path, value, at=(37, 3))
    with pytest.raises(NumericError, match=r"blocks\.0\.proj\.weight.*NaN or Inf.*\[37, 3\]"):
        weights = [1e37] if abs(value) < float("inf") else None  # a finite base value pushed out of bf16
        merge(base, [lora], tmp_path / "out.safetensors", allow_other_base=True, weights=weights)
    assert not (tmp_path / "out.safetensors").exists()


def test_runs_threads_and_direct_io_keep_the_bytes(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    base, lora = _files(tmp_path)
    monkeypatch.setenv(D.NO_DIRECT_ENV, "1")
    monkeypatch.setattr(stacked, "RUN_BYTES", 1 << 60)
    merge(base, [lora], tmp_path / "plain.safetensors", allow_other_base=True)
    monkeypatch.delenv(D.NO_DIRECT_ENV)
    monkeypatch.setattr(apply, "BLOCK_ELEMENTS", 120)  # 3 rows per block
    monkeypatch.setattr(stacked, "RUN_BYTES", 40 * 2 * 9)  # runs of 9 rows: halves on two threads
    monkeypatch.setattr(D, "STAGE", 2 * D.ALIGN)  # the staging buffer fills several times
    merge(base, [lora], tmp_path / "fast.safetensors", allow_other_base=True)
    assert (tmp_path / "fast.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    merged = load_file(tmp_path / "fast.safetensors")["blocks.0.proj.weight"]
    assert not torch.equal(merged, load_file(base)["blocks.0.proj.weight"])
    monkeypatch.setattr(pipeline, "POOL_BYTES", 1)  # one lent piece at a time: each run waits for the writer
    merge(base, [lora], tmp_path / "narrow.safetensors", allow_other_base=True)
    assert (tmp_path / "narrow.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def test_direct_writer_writes_the_buffered_bytes(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(50_000))
    big = 3 * D.ALIGN + 123
    entries = [W.TensorEntry("a", "U8", (5000,)), W.TensorEntry("b", "F32", (3, 7)), W.TensorEntry("c", "U8", (9001,)),
               W.TensorEntry("d", "U8", (2 * big,))]  # fmt: skip
    monkeypatch.setattr(D, "STAGE", 2 * D.ALIGN)
    data = torch.randint(0, 256, (2 * big,), dtype=torch.uint8)
    direct_writes = []
    write_all = D.DirectSink._write_all
    monkeypatch.setattr(D.DirectSink, "_write_all", lambda self, v: direct_writes.append(
        D.address(v) != D.address(memoryview(self.stage))) or write_all(self, v))  # fmt: skip
    outs = []
    for direct in (False, True):
        path = tmp_path / f"out{direct}.safetensors"
        with W.SafetensorsWriter(path, entries, {"k": "v"}, direct=direct) as w:
            w.copy("a", src, 123)
            w.write_part("b", torch.arange(7.0))
            w.write_part("b", torch.arange(14.0).reshape(2, 7))
            w.copy("c", src, 7777)
            at = w.offset_of("d")
            buf = torch.empty(big + D.ALIGN, dtype=torch.uint8)  # placed like its file position: no staging copy
            skip = (at - buf.data_ptr()) % D.ALIGN
            w.write_part("d", buf[skip : skip + big].copy_(data[:big]))
            w.write_part("d", data[big:].clone())  # not placed: staged
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]
    assert torch.equal(load_file(tmp_path / "outTrue.safetensors")["d"], data)
    assert not direct_writes or any(direct_writes) and not all(direct_writes)  # one piece from its own memory


def _fp8_files(tmp_path, nan_at=None):  # noqa: ANN001, ANN202
    from comfy_fp8_support import scaled_file
    from dit_support import kohya_flux, to_bfl, transformer

    model = transformer()
    state = scaled_file(to_bfl(model.state_dict(), "model.diffusion_model."), "model.diffusion_model.")
    key = "model.diffusion_model.single_blocks.0.linear1.weight"
    if nan_at is not None:
        state[key].view(torch.uint8)[nan_at] = 0x7F  # float8_e4m3fn's NaN code
    base = tmp_path / "flux-fp8-scaled.safetensors"
    save_file(state, str(base))
    lora = tmp_path / "lora.safetensors"
    save_file(kohya_flux(model), str(lora))
    return base, lora, key


def test_fp8_scaled_rows_stream_the_whole_tensor_bytes(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    base, lora, _ = _fp8_files(tmp_path)
    monkeypatch.setattr(apply, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(stacked, "_fp8_pieces", lambda *a: None)  # the whole-tensor dequantization, as before
    merge(base, [lora], tmp_path / "whole.safetensors")
    monkeypatch.undo()
    monkeypatch.setattr(apply, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(stacked, "RUN_BYTES", 1)  # one row block per run, halves on two threads
    runs = []
    rows2d = stacked._rows2d
    monkeypatch.setattr(stacked, "_rows2d", lambda *a, **k: runs.append(k.get("fp8") is not None) or rows2d(*a, **k))
    merge(base, [lora], tmp_path / "runs.safetensors")
    assert sum(runs) > 13  # every fp8 weight went by several runs
    assert (tmp_path / "runs.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_unmappable_files_stream_the_same_bytes(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Where the base file cannot be mapped, the runs read it (pread for 16-bit rows; an fp8 tensor's codes once,
    not once per run): the same bytes as the mapped runs."""
    from loratools.ops.merge.write import BaseBytes

    base, lora, _ = _fp8_files(tmp_path)
    monkeypatch.setattr(apply, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(stacked, "RUN_BYTES", 1)
    merge(base, [lora], tmp_path / "mapped.safetensors")
    monkeypatch.setattr(BaseBytes, "mapped_rows", lambda *a, **k: None)
    merge(base, [lora], tmp_path / "read.safetensors")
    assert (tmp_path / "read.safetensors").read_bytes() == (tmp_path / "mapped.safetensors").read_bytes()


def test_fp8_nan_code_named_at_its_index_in_the_tensor(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(apply, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(stacked, "RUN_BYTES", 1)
    base, lora, key = _fp8_files(tmp_path, nan_at=(13, 2))
    with pytest.raises(NumericError, match=rf"{key} dequantizes to NaN/Inf in bfloat16 \(first at index \[13, 2\]\)"):
        merge(base, [lora], tmp_path / "out.safetensors")


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_lookup_is_the_computed_dequantization(fp8, dtype) -> None:  # noqa: ANN001
    from loratools.checkpoint.quant.comfy_fp8 import dequantize_fp8, dequantize_pairs, pair_table

    scale = torch.tensor(3.7e-4)
    table = pair_table(scale, fp8, dtype)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (2 * 65536 + 3,), generator=g, dtype=torch.uint8)
    codes[:512] = torch.arange(256, dtype=torch.uint8).repeat(2)  # every code (NaN codes too) in both bytes
    for q in (codes[:-3], codes[1:-2], codes):  # even, at an odd offset, an odd count: the computed path
        q = q.view(fp8)
        out = torch.empty(q.shape, dtype=dtype)
        want = dequantize_fp8(q, scale).to(dtype)
        assert torch.equal(dequantize_pairs(q, scale, table, out).view(torch.int16), want.view(torch.int16))
