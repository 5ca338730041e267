"""Hostile inputs for the low-level file readers (issue 19 §3, hangs and memory): safetensors headers listing
more tensors than the file can hold, torch.save archives whose members inflate far beyond their size on disk,
and a sparse 2 GiB adapter tensor that ``info`` must describe from its header and ``validate`` scan in chunks.

Each is a PEFT folder (PEFT's save_pretrained: fixtures/peft/llama-lora) whose weights file was replaced.
``test_hostile_memory.py`` runs the costly ones in a child process and bounds its peak RSS.
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from hostile import ADAPTER_COMMANDS, HostileCase
from reliability_support import LLAMA_LORA, PEFT_Q0

GiB = 1 << 30


def _folder(folder: Path, stem: str) -> Path:
    out = folder / stem
    shutil.copytree(LLAMA_LORA, out)
    (out / "adapter_model.safetensors").unlink()
    return out


def _header_file(path: Path, entries: bytes, count_data: int = 0) -> None:
    head = b"{" + entries + b"}"
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.write(b"\0" * count_data)


def many_entries(n: int, nbytes: int, stem: str) -> Callable[[Path], Path]:
    """A safetensors file listing ``n`` U8 tensors of ``nbytes`` each (0: empty), with data for none of them."""

    def build(folder: Path) -> Path:
        out = _folder(folder, stem)
        shape = b"[0]" if nbytes == 0 else b"[%d]" % nbytes
        entries = b",".join(
            b'"t%d":{"dtype":"U8","shape":%s,"data_offsets":[%d,%d]}' % (i, shape, i * nbytes, (i + 1) * nbytes)
            for i in range(n)
        )
        _header_file(out / "adapter_model.safetensors", entries, count_data=min(n * nbytes, 64))
        return out

    return build


@functools.lru_cache(maxsize=4)
def _bomb_bytes(member: str, size: int) -> bytes:
    """A real torch.save archive whose ``member`` is replaced by ``size`` zero bytes, deflated (~1000:1); made
    once per process (deflating 2 GiB takes seconds)."""
    import io
    import tempfile

    import torch

    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "a.bin"
        torch.save({f"{PEFT_Q0}.lora_A.weight": torch.randn(4, 32, generator=g),
                    f"{PEFT_Q0}.lora_B.weight": torch.randn(32, 4, generator=g)}, src)
        with zipfile.ZipFile(src) as z:
            kept = [(n, z.read(n)) for n in z.namelist()]
    buf = io.BytesIO()
    chunk = bytes(1 << 24)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for n, data in kept:
            if not n.endswith(member):
                z.writestr(n, data)
                continue
            info = zipfile.ZipInfo(n)
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                for _ in range(size // len(chunk)):
                    f.write(chunk)
                f.write(bytes(size % len(chunk)))
    return buf.getvalue()


def zip_bomb(member: str, size: int, stem: str) -> Callable[[Path], Path]:
    """A PEFT folder whose adapter_model.bin has ``member`` inflating to ``size`` bytes."""

    def build(folder: Path) -> Path:
        out = _folder(folder, stem)
        (out / "adapter_model.bin").write_bytes(_bomb_bytes(member, size))
        return out

    return build


def sparse_tensor(nbytes: int, nan_at_end: bool, stem: str) -> Callable[[Path], Path]:
    """A PEFT folder whose q_proj lora_A is an F32 tensor of ``nbytes`` (a sparse file: no disk used)."""

    def build(folder: Path) -> Path:
        out = _folder(folder, stem)
        cols = nbytes // 4 // 4
        a = {"dtype": "F32", "shape": [4, cols], "data_offsets": [0, 16 * cols]}
        b = {"dtype": "F32", "shape": [32, 4], "data_offsets": [16 * cols, 16 * cols + 512]}
        raw = json.dumps({f"{PEFT_Q0}.lora_A.weight": a, f"{PEFT_Q0}.lora_B.weight": b}).encode()
        raw += b" " * (-len(raw) % 8)
        path = out / "adapter_model.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            start = f.tell()
            f.truncate(start + 16 * cols + 512)
            f.seek(start + 16 * cols)
            f.write(struct.pack("<128f", *([0.5] * 128)))
            if nan_at_end:
                f.seek(start + 16 * cols - 4)
                f.write(struct.pack("<f", float("nan")))
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["target_modules"] = ["q_proj"]
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        return out

    return build


def duplicate_key(stem: str) -> Callable[[Path], Path]:
    """llama-lora's weights file whose header lists q_proj's lora_A a second time, over lora_B's bytes (json keeps
    the last: read silently before; probe4)."""

    def build(folder: Path) -> Path:
        out = _folder(folder, stem)
        data = (LLAMA_LORA / "adapter_model.safetensors").read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        a, b = f"{PEFT_Q0}.lora_A.weight", f"{PEFT_Q0}.lora_B.weight"
        text = json.dumps(header)[:-1] + f", {json.dumps(a)}: {json.dumps(header[b])}}}"
        head = text.encode() + b" " * (-len(text) % 8)
        (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n :])
        return out

    return build


#: the sparse tensor's commands: convert and merge write (or apply) the whole tensor and are not bounded here
READERS = {k: ADAPTER_COMMANDS[k] for k in ("info", "validate", "validate-base")}


def _cases() -> list[HostileCase]:
    c = []

    def case(name: str, build, expect: list[str], validate_exit: int = 2, commands=None) -> None:
        c.append(HostileCase(f"files-{name}", build, expect, dict(commands or ADAPTER_COMMANDS), validate_exit))

    case("st-1m-empty-entries", many_entries(1_000_000, 0, "hostile-st-1m-empty"), ["lists 1000000 tensors"])
    case("st-5000-empty-entries", many_entries(5000, 0, "hostile-st-5000-empty"), ["lists 5000 tensors"])
    case("st-400k-tensors", many_entries(400_000, 1, "hostile-st-400k"), ["lists 400000 tensors"])
    case("st-entries-beyond-data", many_entries(20_000, 1, "hostile-st-beyond-data"), ["but only 64 data bytes"])
    case("pickle-bomb-data-pkl", zip_bomb("data.pkl", 2 * GiB, "hostile-pickle-bomb"), ["data.pkl", "2147483648"])
    case("pickle-bomb-storage", zip_bomb("data/0", GiB, "hostile-storage-bomb"), ["data/0", "compressed"])
    case("pickle-big-data-pkl", zip_bomb("data.pkl", 64 << 20, "hostile-pickle-64m"), ["data.pkl", "limit"])
    case("st-duplicate-key", duplicate_key("hostile-st-duplicate"), ["lora_A.weight", "twice"])
    case("sparse-2gib-nan", sparse_tensor(2 * GiB, True, "hostile-sparse-2g-nan"), ["lora_A", "NaN"],
         validate_exit=1, commands=READERS)
    return c


CASES = _cases()
__all__ = ["CASES", "GiB", "READERS", "sparse_tensor"]
