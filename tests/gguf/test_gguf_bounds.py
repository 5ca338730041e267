"""The bounded GGUF header reader (loratools/files/gguf_file.py) against the gguf package's reader, a seeded
fuzzer over GGUF headers, and the claimed-size class in a child process whose peak RSS is measured.

The hostile inputs themselves are built by tests/reliability/hostile_gguf.py (every command on each is
run by tests/reliability/test_hostile.py).
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from gguf_support import GGUF, TESTS

sys.path.insert(0, str(TESTS / "reliability"))
import hostile_gguf as hg  # noqa: E402
from reliability_support import LLAMA_BASE, LLAMA_LORA  # noqa: E402

from loratools.errors import LoratoolsError  # noqa: E402
from loratools.files.gguf_file import open_gguf_file  # noqa: E402

FIXTURE_FILES = sorted(GGUF.glob("*.gguf"))
ONE_GB_KB = 1 << 20  # ru_maxrss is in KiB on Linux


def _raw_value(f: gguf.ReaderField) -> bytes:
    return b"".join(p.tobytes() for p in f.parts[3:])


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.name for p in FIXTURE_FILES])
def test_reader_agrees_with_the_gguf_package(path: Path) -> None:
    """Every field (types, value) and tensor (name, type, shape, offset, bytes) as gguf.GGUFReader reads them."""
    ours, theirs = open_gguf_file(path), gguf.GGUFReader(path)
    assert ours.alignment == theirs.alignment and ours.data_start == theirs.data_offset
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields)
    for key, f in fields.items():
        assert list(ours.fields[key].types) == [int(t) for t in f.types], key
        assert ours.fields[key].contents() == f.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.tensor_type, a.dims, a.data_offset, a.n_bytes) == (
            b.tensor_type,
            tuple(b.shape.tolist()),
            b.data_offset,
            b.n_bytes,
        )
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert a.data.tobytes() == b.data.tobytes()


def test_merge_copies_metadata_byte_for_byte(tmp_path: Path) -> None:
    """A base's key/values (a numeric array, a string array, bytes that are not UTF-8 in a name) reach the
    merged GGUF as they were, read back with the gguf package."""
    from loratools.ops.merge.gguf import merge_gguf

    raw = hg.valid_base()
    raw.put("general.junk", hg.ARR, hg.array(hg.U8, [], 1 << 16) + bytes(range(256)) * 256)
    raw.put("general.scores", hg.ARR, hg.array(hg.F32, [0.5, -1.25, 3.0]))
    base = tmp_path / "model.gguf"
    base.write_bytes(raw.encode())
    out = tmp_path / "merged.gguf"
    merge_gguf(base, [LLAMA_LORA], out, verify=True)
    before, after = gguf.GGUFReader(base), gguf.GGUFReader(out)
    for key, f in before.fields.items():
        if not key.startswith("GGUF."):
            assert [int(t) for t in after.fields[key].types] == [int(t) for t in f.types], key
            assert _raw_value(after.fields[key]) == _raw_value(f), key


def test_a_real_large_array_is_skipped_not_built(tmp_path: Path) -> None:
    """A 4 MiB uint8 array the file really holds: only its length is read to step over it (GGUFReader
    builds one numpy part per element); its values are there when asked for."""
    raw = hg.valid_adapter()
    raw.put("general.junk", hg.ARR, hg.array(hg.U8, [], 4 << 20) + bytes(range(256)) * (4 << 12))
    path = tmp_path / "adapter.gguf"
    path.write_bytes(raw.encode())
    f = open_gguf_file(path)
    assert f.fields["general.junk"].count == 4 << 20
    values = f.fields["general.junk"].values()
    assert values.shape == (4 << 20,) and int(values[257]) == 1


# -- the seeded fuzzer --------------------------------------------------------------------------------------
SPECIAL_U64 = [0, 1, 7, 255, (1 << 31) - 1, 1 << 32, (1 << 32) - 1, 1 << 40, 1 << 62, (1 << 63) - 1, (1 << 64) - 1]
SPECIAL_U32 = [0, 1, 3, 4, 8, 9, 12, 13, 16, 99, 1 << 16, (1 << 31) - 1, (1 << 32) - 1]


def _mutate(data: bytes, header_end: int, rng: random.Random) -> bytes:
    """One mutation of ``data`` inside its first ``header_end`` bytes (the header and tensor infos)."""
    buf = bytearray(data)
    header_end = min(header_end, len(buf))
    if header_end < 16:
        return data
    kind = rng.randrange(6)
    pos = rng.randrange(4, header_end - 8)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(4, header_end)] = rng.randrange(256)
    elif kind == 1:  # a length or count: a huge or odd uint64
        buf[pos : pos + 8] = struct.pack("<Q", rng.choice(SPECIAL_U64))
    elif kind == 2:  # a type code, a dimension count, a uint32 value
        buf[pos : pos + 4] = struct.pack("<I", rng.choice(SPECIAL_U32))
    elif kind == 3:  # cut short
        del buf[rng.randrange(4, len(buf)) :]
    elif kind == 4:  # bytes inserted or lost: everything after shifts
        if rng.random() < 0.5:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        else:
            del buf[pos : pos + rng.randint(1, 9)]
    else:  # a NaN, an Inf or a negative float / int where a number was
        buf[pos : pos + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -1.0, -4.0]))
    return bytes(buf)


KEYS = [
    "general.type",
    "adapter.type",
    "adapter.lora.alpha",
    "general.architecture",
    "llama.block_count",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "general.alignment",
    "loratools.provenance",
    "adapter.alora.invocation_tokens",
    "loratools.base_model",
    "tokenizer.ggml.tokens",
]
DIMS = [0, 1, 3, 4, 16, 17, 32, 33, 48, 96, 256, 1 << 32]
TYPES = [0, 1, 8, 30, 2, 12, 14, 16, 24, 26, 28, 99]  # F32 F16 Q8_0 BF16 Q4_0 Q4_K Q6_K IQ2_XXS I8 I32 F64 ?


def _random_value(rng: random.Random) -> tuple[int, bytes]:
    code = rng.choice([hg.U32, hg.I32, hg.F32, hg.F64, hg.STR, hg.BOOL, hg.U64, hg.ARR, hg.ARR])
    if code == hg.STR:
        return code, hg.text(
            rng.choice(["adapter", "lora", "model", "llama", "qwen2", "gpt2", "{", "[" * 3000, b"\xff\xfe", "", "16"])
        )
    if code == hg.ARR:
        item = rng.choice([hg.U32, hg.I32, hg.F32, hg.STR, hg.U8])
        items = {hg.STR: ["a", "b"], hg.F32: [1.5, float("nan")], hg.I32: [3, -1]}.get(item, [1, 2, 3])
        return code, hg.array(item, items, rng.choice([None, None, 0, 1 << 40]))
    values = {
        hg.F32: [float("nan"), float("inf"), -1.0, 0.0, 8.0, 1e30],
        hg.F64: [float("-inf"), 4.0],
        hg.BOOL: [True],
        hg.I32: [-4, 0, 2, 4],
        hg.U64: [0, 2, 1 << 40],
    }
    return code, hg.value(code, rng.choice(values.get(code, [0, 1, 2, 3, 4, 6, 8, 1024, 1025, (1 << 31) - 1])))


def _structured(raw: hg.RawGguf, rng: random.Random) -> None:
    """One change that keeps the file parseable more often than a byte flip: a field's type or value, a
    tensor's dimensions, type, offset or name (its data resized to fit, mostly)."""
    import gguf

    kind = rng.randrange(5)
    if kind == 0:
        raw.put(rng.choice(KEYS), *_random_value(rng))
    elif kind == 1 and raw.kv:
        del raw.kv[rng.randrange(len(raw.kv))]
    elif kind in (2, 3) and raw.tensors:
        t = rng.choice(raw.tensors)
        if kind == 2:
            t.dims = tuple(rng.choice(DIMS) for _ in range(rng.choice([1, 2, 2, 2, 3, 5])))
        else:
            t.type = rng.choice(TYPES)
        sizes = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(t.type)) if t.type != 99 else None
        n = 1
        for d in t.dims:
            n *= d
        if sizes and n < 1 << 20 and rng.random() < 0.8:
            t.data = hg.junk(n // sizes[0] * sizes[1])
    elif raw.tensors:
        t = rng.choice(raw.tensors)
        choice = rng.randrange(4)
        if choice == 0:
            t.name = t.name[:-1] + ("a" if t.name.endswith("b") else "b")
        elif choice == 1:
            t.name = str(t.name).replace("blk.0", "blk." + rng.choice(["1", "7", "2147483647"]))
        elif choice == 2:
            raw.tensors.remove(t)
        else:
            t.data = struct.pack("<f", float("nan")) + t.data[4:]


def _fuzz(source: Path | bytes, tmp: Path, seeds: range, readers: list) -> list[str]:
    """Half the mutants byte-level (:func:`_mutate`), half structured (:func:`_structured`)."""
    data0 = source if isinstance(source, bytes) else source.read_bytes()
    header_end = open_gguf_file(_write(tmp / "valid.gguf", data0)).data_start
    parsed = hg.parse(tmp / "valid.gguf")
    escaped = []
    for seed in seeds:
        rng = random.Random(seed)
        if seed % 2:
            data = data0
            for _ in range(rng.randint(1, 3)):
                data = _mutate(data, header_end, rng)
        else:
            raw = hg.copy.deepcopy(parsed)
            for _ in range(rng.randint(1, 3)):
                _structured(raw, rng)
            data = raw.encode()
        path = _write(tmp / f"fuzz-{seed % 7}.gguf", data)
        for read in readers:
            try:
                read(path, tmp)
            except LoratoolsError:
                pass
            except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
                escaped.append(f"seed {seed}, {read.__name__}: {exc.__class__.__name__}: {exc}"[:300])
    return escaped


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _read_header(path: Path, tmp: Path) -> None:
    open_gguf_file(path)


def _load_adapter(path: Path, tmp: Path) -> None:
    from loratools import load_adapter

    load_adapter(path)


def _load_adapter_for_base(path: Path, tmp: Path) -> None:
    from loratools import load_adapter

    load_adapter(path, base=LLAMA_BASE)


def _load_base(path: Path, tmp: Path) -> None:
    from loratools.formats.gguf.names import load_base

    load_base(path)


def _merge_into(path: Path, tmp: Path) -> None:
    from loratools.ops.merge.gguf import merge_gguf

    out = tmp / "merged.gguf"
    out.unlink(missing_ok=True)
    merge_gguf(path, [LLAMA_LORA], out)


def test_fuzzed_adapter_headers_raise_only_loratools_errors(tmp_path: Path) -> None:
    source = hg.valid_adapter().encode()
    escaped = _fuzz(source, tmp_path, range(1000), [_read_header, _load_adapter, _load_adapter_for_base])
    assert not escaped, "\n".join(escaped[:20])


def test_fuzzed_base_headers_raise_only_loratools_errors(tmp_path: Path) -> None:
    source = GGUF / "llama-q8_0.gguf"
    escaped = _fuzz(source, tmp_path, range(1000, 1400), [_read_header, _load_base, _merge_into])
    assert not escaped, "\n".join(escaped[:20])


# -- claimed sizes: bounded memory in a child process ------------------------------------------------------
_CHILD = """
import json, sys
sys.path[:0] = sys.argv[1:3]
from reliability_support import invoke
codes = [invoke(*args)[0] for args in json.loads(sys.argv[3])]
print(json.dumps(codes))
"""
_MEASURE = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=600)
print(r.stdout.strip().splitlines()[-1] if r.returncode == 0 else "FAILED " + r.stderr[-2000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_claimed_sizes_stay_under_one_gigabyte(tmp_path: Path) -> None:
    """Every 'huge' hostile case through every command it lists, and the real 4 MiB array through info,
    validate, convert and merge, in one child process: each refused (or, the real array, done) and the
    child's peak RSS at most 1 GB. The timeout is a hang guard only."""
    runs, want = [], []
    for case in (c for c in hg.CASES if "-huge-" in c.name):
        folder = tmp_path / case.name
        folder.mkdir()
        path = case.build(folder)
        for command, template in sorted(case.commands.items()):
            out = folder / f"out-{command}"
            runs.append([str(path if a in ("A", "B") else out if a == "O" else a) for a in template])
            want.append(2)
    big = hg.valid_adapter()
    big.put("general.junk", hg.ARR, hg.array(hg.U8, [], 4 << 20) + bytes(4 << 20))
    adapter = _write(tmp_path / "big-adapter.gguf", big.encode())
    base = hg.valid_base()
    base.put("general.junk", hg.ARR, hg.array(hg.U8, [], 4 << 20) + bytes(4 << 20))
    model = _write(tmp_path / "big-model.gguf", base.encode())
    for args in (
        ["info", adapter],
        ["validate", adapter],
        ["convert", adapter, "--to", "peft", "-o", tmp_path / "big-peft"],
        ["merge", LLAMA_BASE, adapter, "-o", tmp_path / "big-merged"],
        ["info", LLAMA_LORA, "--base", model],
        ["merge", model, LLAMA_LORA, "-o", tmp_path / "big-merged.gguf"],
    ):
        runs.append([str(a) for a in args])
        want.append(0)
    paths = [str(TESTS / "reliability"), str(TESTS)]
    child = [sys.executable, "-c", _CHILD, *paths, json.dumps(runs)]
    r = subprocess.run([sys.executable, "-c", _MEASURE, *child], capture_output=True, text=True, timeout=900)
    codes_line, rss_line = r.stdout.strip().splitlines()[-2:]
    assert not codes_line.startswith("FAILED"), codes_line
    codes = json.loads(codes_line)
    assert [(run, c) for run, c, w in zip(runs, codes, want, strict=True) if c != w] == []
    assert int(rss_line) <= ONE_GB_KB, f"child peak RSS {int(rss_line) / 1024:.0f} MB for {len(runs)} commands"
