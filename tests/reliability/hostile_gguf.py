"""Hostile GGUF adapters and bases (issue 19 section 3), built byte by byte from a valid file.

:class:`RawGguf` is a GGUF file as parts (key/values as encoded bytes, tensor infos, data) that can be
broken anywhere and encoded again; the valid sources are an adapter loratools converts from the llama-lora
fixture and the llama-f32 / llama-q8_0 GGUF fixtures, parsed with the ``gguf`` package's own reader. Every
class of the issue has several variants: claimed sizes far beyond the file (arrays of 2⁴⁰ elements, counts
of 2⁶³, block_count 2³¹−1), head counts, alphas, strings that are not UTF-8, tensors sharing bytes or
lying outside the file, factors of the wrong type, width, rank or dimension count, and damaged bases.
"""

from __future__ import annotations

import copy
import functools
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hostile import ADAPTER_COMMANDS, BASE_COMMANDS, HostileCase
from reliability_support import FIXTURES, LLAMA_LORA

GGUF_F32 = FIXTURES / "gguf" / "llama-f32.gguf"
GGUF_Q8 = FIXTURES / "gguf" / "llama-q8_0.gguf"
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}
NAN, INF = float("nan"), float("inf")
Q = "blk.0.attn_q.weight"


def text(value: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string: uint64 length (``length`` to lie about it) + bytes."""
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def value(code: int, v: object) -> bytes:
    return text(v) if code == STR else struct.pack("<" + _FMT[code], v)  # type: ignore[arg-type]


def array(code: int, items: list, count: int | None = None) -> bytes:
    """An array's bytes after its type code: item type, count (``count`` to lie), items."""
    body = b"".join(value(code, v) for v in items) if code != ARR else b"".join(items)
    return struct.pack("<IQ", code, len(items) if count is None else count) + body


@dataclass
class RawTensor:
    name: str | bytes
    dims: tuple[int, ...]  # GGUF order: ne[0] first
    type: int
    data: bytes
    offset: int | None = None  # relative data offset; None: laid out after the previous tensor
    name_length: int | None = None


@dataclass
class RawGguf:
    kv: list[tuple[bytes, int, bytes]]  # (encoded key, type code, encoded value)
    tensors: list[RawTensor]
    version: int = 3
    n_tensors: int | None = None
    n_kv: int | None = None
    alignment: int = 32
    cut: int | None = None  # keep only the first ``cut`` bytes (negative: drop that many)
    header_hook: Callable[[bytes], bytes] | None = field(default=None, repr=False)

    def index(self, key: str) -> int:
        return next(i for i, (k, _, _) in enumerate(self.kv) if k == text(key))

    def put(self, key: str | bytes, code: int, encoded: bytes) -> None:
        """Set (or add) ``key`` to the already encoded value ``encoded`` of type ``code``."""
        entry = (text(key), code, encoded)
        try:
            self.kv[self.index(key)] = entry  # type: ignore[arg-type]
        except (StopIteration, TypeError):
            self.kv.append(entry)

    def set(self, key: str | bytes, code: int, v: object) -> None:
        self.put(key, code, value(code, v))

    def drop(self, key: str) -> None:
        del self.kv[self.index(key)]

    def tensor(self, name: str) -> RawTensor:
        return next(t for t in self.tensors if t.name == name)

    def encode(self) -> bytes:
        head = b"GGUF" + struct.pack(
            "<IQQ",
            self.version,
            self.n_tensors if self.n_tensors is not None else len(self.tensors),
            self.n_kv if self.n_kv is not None else len(self.kv),
        )
        kvs = b"".join(k + struct.pack("<I", code) + v for k, code, v in self.kv)
        data, infos = bytearray(), b""
        for t in self.tensors:
            off = t.offset
            if off is None:
                off = -(-len(data) // self.alignment) * self.alignment
            if off < 1 << 24:  # an offset far past the end stays a claim
                data += bytes(max(off + len(t.data) - len(data), 0))
                data[off : off + len(t.data)] = t.data
            infos += text(t.name, t.name_length) + struct.pack("<I", len(t.dims))
            infos += struct.pack(f"<{len(t.dims)}Q", *t.dims) + struct.pack("<IQ", t.type, off)
        header = head + kvs + infos
        if self.header_hook:
            header = self.header_hook(header)
        out = header + bytes(-len(header) % self.alignment) + bytes(data)
        return out if self.cut is None else out[: self.cut]


def parse(path: Path) -> RawGguf:
    """A valid GGUF file as a :class:`RawGguf` (read with the gguf package's reader, the oracle here)."""
    import gguf

    r = gguf.GGUFReader(path)
    kv = [
        (text(f.name), int(f.parts[2][0]), b"".join(p.tobytes() for p in f.parts[3:]))
        for f in r.fields.values()
        if not f.name.startswith("GGUF.")
    ]
    tensors = [
        RawTensor(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), t.data.tobytes()) for t in r.tensors
    ]
    return RawGguf(kv, tensors, alignment=int(r.alignment))


@functools.cache
def _valid_adapter() -> RawGguf:
    """llama-lora converted to a GGUF adapter for llama-f32.gguf (blk.{0,1}.{attn_q,attn_v,ffn_up,ffn_down})."""
    from loratools import load_adapter, save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapter.gguf"
        save_adapter(load_adapter(LLAMA_LORA), out, format="gguf", base=GGUF_F32)
        return parse(out)


@functools.cache
def _valid_base(path: Path) -> RawGguf:
    return parse(path)


def valid_adapter() -> RawGguf:
    return copy.deepcopy(_valid_adapter())


def valid_base(path: Path = GGUF_F32) -> RawGguf:
    return copy.deepcopy(_valid_base(path))


Edit = Callable[[RawGguf], None]


def _builder(source: Callable[[], RawGguf], name: str, edit: Edit) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        raw = source()
        edit(raw)
        path = folder / name
        path.write_bytes(raw.encode())
        return path

    return build


def adapter(
    name: str, edit: Edit, expect: list[str], commands: tuple[str, ...] | None = None, validate_exit: int = 2
) -> HostileCase:
    every = {**ADAPTER_COMMANDS, "merge-gguf": ["merge", GGUF_F32, "A", "-o", "O"]}  # the GGUF merge path too
    cmds = {k: v for k, v in every.items() if commands is None or k in commands}
    return HostileCase(f"gguf-{name}", _builder(valid_adapter, "adapter.gguf", edit), expect, cmds, validate_exit)


#: an adapter written for another base: what validate --base reports as a finding, merge refuses
OTHER_BASE = {"commands": ("validate-base", "merge", "merge-gguf"), "validate_exit": 1}


def base(
    name: str, edit: Edit, expect: list[str], commands: tuple[str, ...] | None = None, source: Path = GGUF_F32
) -> HostileCase:
    cmds = {k: v for k, v in BASE_COMMANDS.items() if commands is None or k in commands}
    build = _builder(lambda: valid_base(source), "model.gguf", edit)
    return HostileCase(f"gguf-base-{name}", build, expect, cmds)


# -- edits --------------------------------------------------------------------------------------------------
def put(key: str | bytes, code: int, encoded: bytes) -> Edit:
    return lambda r: r.put(key, code, encoded)


def setv(key: str, code: int, v: object) -> Edit:
    return lambda r: r.set(key, code, v)


def attr(**kw: object) -> Edit:
    return lambda r: [setattr(r, k, v) for k, v in kw.items()] and None


def on_tensor(tensor: str, **kw: object) -> Edit:
    return lambda r: [setattr(r.tensor(tensor), k, v) for k, v in kw.items()] and None


def junk(n: int) -> bytes:
    """``n`` deterministic garbage bytes (every run builds the same file)."""
    return bytes((i * 37 + 11) % 256 for i in range(n))


def _first_value(tensor: str, code: bytes) -> Edit:
    def edit(r: RawGguf) -> None:
        t = r.tensor(tensor)
        t.data = code + t.data[len(code) :]

    return edit


def _share_offset(a: str, b: str, delta: int = 0) -> Edit:
    def edit(r: RawGguf) -> None:
        offsets, pos = {}, 0
        for t in r.tensors:
            pos = -(-pos // r.alignment) * r.alignment
            offsets[t.name] = pos
            pos += len(t.data)
        for t in r.tensors:
            t.offset = offsets[t.name]
        r.tensor(b).offset = offsets[a] + delta

    return edit


def _both(*edits: Edit) -> Edit:
    return lambda r: [e(r) for e in edits] and None


def _add_tensor(t: RawTensor) -> Edit:
    return lambda r: r.tensors.append(t)


def _drop_tensor(name: str) -> Edit:
    return lambda r: r.tensors.remove(r.tensor(name))


def _big_endian(header: bytes) -> bytes:
    return header[:4] + struct.pack(">I", 3) + header[8:]


GIANT = 1 << 40


def _one_tensor_fewer(header: bytes) -> bytes:
    """The header with its tensor count one less than the tensor infos it holds."""
    return header[:8] + struct.pack("<Q", struct.unpack_from("<Q", header, 8)[0] - 1) + header[16:]
F32_ROWS = bytes(4 * 33 * 4)
CASES: list[HostileCase] = [
    # claimed sizes far beyond the file: refused before anything is allocated or looped over
    adapter("huge-array-u8", put("general.junk", ARR, array(U8, [], GIANT)), ["general.junk"]),
    adapter("huge-array-str", put("general.junk", ARR, array(STR, [], GIANT)), ["general.junk"]),
    adapter("huge-array-u64", put("general.junk", ARR, array(U64, [1], 1 << 62)), ["general.junk"]),
    adapter("huge-array-nested", put("general.junk", ARR, array(ARR, [array(U8, [], GIANT)])), ["general.junk"]),
    adapter(
        "huge-array-deep",
        put("general.junk", ARR, array(ARR, [array(ARR, [array(ARR, [array(U8, [1])])])])),
        ["general.junk"],
    ),
    adapter("huge-string", put("general.name", STR, text("x", GIANT)), ["general.name"]),
    adapter("huge-kv-count", attr(n_kv=1 << 63), ["key/value"]),
    adapter("huge-tensor-count", attr(n_tensors=GIANT), ["tensor infos"]),
    adapter("huge-tensor-name", on_tensor(f"{Q}.lora_a", name_length=GIANT), ["tensor name"]),
    adapter("huge-tensor-dims", on_tensor(f"{Q}.lora_a", dims=(1 << 32, 1 << 32)), [f"{Q}.lora_a", "past the end"]),
    adapter("huge-block-count", setv("llama.block_count", U32, (1 << 31) - 1), ["llama.block_count"]),
    # block_count
    adapter("blocks-u32-max", setv("llama.block_count", U32, (1 << 32) - 1), ["llama.block_count"]),
    adapter("blocks-zero", setv("llama.block_count", U32, 0), ["llama.block_count"]),
    adapter("blocks-negative", setv("llama.block_count", I32, -1), ["llama.block_count"]),
    adapter("blocks-string", setv("llama.block_count", STR, "2"), ["llama.block_count"]),
    adapter("blocks-array", put("llama.block_count", ARR, array(U32, [2, 2])), ["llama.block_count"]),
    adapter("blocks-too-few", setv("llama.block_count", U32, 1), ["llama.block_count", "blk.1."]),
    adapter("blocks-other-base", setv("llama.block_count", U32, 3), ["llama.block_count"], **OTHER_BASE),
    # head counts
    adapter("heads-zero", setv("llama.attention.head_count", U32, 0), ["llama.attention.head_count"]),
    adapter("heads-negative", setv("llama.attention.head_count", I32, -4), ["llama.attention.head_count"]),
    adapter("heads-float", setv("llama.attention.head_count", F32, 4.0), ["llama.attention.head_count"]),
    adapter("heads-kv-zero", setv("llama.attention.head_count_kv", U32, 0), ["head_count_kv"]),
    adapter("heads-kv-not-dividing", setv("llama.attention.head_count_kv", U32, 3), ["head_count_kv"]),
    adapter("heads-kv-above-heads", setv("llama.attention.head_count_kv", U32, 8), ["head_count_kv"]),
    adapter(
        "heads-rows-do-not-split",
        setv("llama.attention.head_count", U32, 6),
        ["attention.head_count"],
        ("info", "validate", "convert"),
    ),
    adapter("heads-other-base", setv("llama.attention.head_count", U32, 8), ["attention.head_count"], **OTHER_BASE),
    # adapter.lora.alpha
    adapter("alpha-nan", setv("adapter.lora.alpha", F32, NAN), ["adapter.lora.alpha"]),
    adapter("alpha-inf", setv("adapter.lora.alpha", F32, INF), ["adapter.lora.alpha"]),
    adapter("alpha-minus-inf", setv("adapter.lora.alpha", F64, -INF), ["adapter.lora.alpha"]),
    adapter("alpha-string", setv("adapter.lora.alpha", STR, "16"), ["adapter.lora.alpha"]),
    adapter("alpha-array", put("adapter.lora.alpha", ARR, array(F32, [16.0])), ["adapter.lora.alpha"]),
    adapter("alpha-bool", setv("adapter.lora.alpha", BOOL, True), ["adapter.lora.alpha"]),
    # strings that are not UTF-8, or not strings
    adapter("utf8-general-type", put("general.type", STR, text(b"adap\xffter")), ["general.type"]),
    adapter("utf8-adapter-type", put("adapter.type", STR, text(b"lo\xc3ra")), ["adapter.type"]),
    adapter("utf8-architecture", put("general.architecture", STR, text(b"\xfe\xffllama")), ["general.architecture"]),
    adapter("utf8-key", setv(b"general.\xff", U32, 1), ["metadata key"]),
    adapter("utf8-tensor-name", on_tensor(f"{Q}.lora_a", name=f"{Q}.lora_a".encode() + b"\xff"), ["tensor name"]),
    adapter("type-not-string", setv("general.type", U32, 7), ["general.type"]),
    adapter("architecture-other-base", setv("general.architecture", STR, "qwen2"), ["qwen2"], **OTHER_BASE),
    # tensors sharing bytes or lying outside the file
    adapter("overlap-same-offset", _share_offset(f"{Q}.lora_a", f"{Q}.lora_b"), ["share bytes", f"{Q}.lora_a"]),
    adapter("overlap-partial", _share_offset(f"{Q}.lora_a", f"{Q}.lora_b", 256), ["share bytes", f"{Q}.lora_b"]),
    adapter("offset-past-end", on_tensor(f"{Q}.lora_b", offset=GIANT), [f"{Q}.lora_b", "past the end"]),
    adapter(
        "offset-misaligned",
        _both(_share_offset(Q + ".lora_a", Q + ".lora_a"), on_tensor(Q + ".lora_b", offset=4)),
        [f"{Q}.lora_b", "alignment"],
    ),
    adapter("data-truncated", attr(cut=-100), ["past the end"]),
    # factors the loader cannot pair: type, width, rank, dimensions
    adapter(
        "factor-iq2-xxs",
        on_tensor(f"{Q}.lora_a", dims=(256, 4), type=16, data=junk(4 * 66)),
        [f"{Q}.lora_a", "IQ2_XXS"],
    ),
    adapter(
        "factor-q4-k", on_tensor(f"{Q}.lora_a", dims=(256, 4), type=12, data=junk(4 * 144)), [f"{Q}.lora_a", "Q4_K"]
    ),
    adapter("factor-i32", on_tensor(f"{Q}.lora_a", type=26), [f"{Q}.lora_a", "I32"]),
    adapter("factor-unknown-type", on_tensor(f"{Q}.lora_a", type=99), [f"{Q}.lora_a", "unknown tensor type 99"]),
    adapter(
        "factor-partial-block", on_tensor(f"{Q}.lora_a", dims=(33, 4), type=8, data=bytes(4 * 34)), [f"{Q}.lora_a"]
    ),
    adapter(
        "factor-in-features",
        on_tensor("blk.1.attn_q.weight.lora_a", dims=(33, 4), data=F32_ROWS),
        ["blk.1.attn_q.weight.lora_a", "input width of 33"],
    ),
    adapter(
        "factor-ffn-in-features",
        on_tensor("blk.1.ffn_down.weight.lora_a", dims=(47, 4), data=bytes(4 * 47 * 4)),
        ["ffn_down.weight.lora_a", "input width of 47"],
    ),
    adapter(
        "factor-out-features",
        on_tensor("blk.1.attn_v.weight.lora_b", dims=(4, 17), data=bytes(4 * 17 * 4)),
        ["blk.1.attn_v.weight.lora_b", "output width of 17"],
    ),
    adapter("factor-rank", on_tensor(f"{Q}.lora_b", dims=(3, 32), data=bytes(4 * 3 * 32)), [Q, "rank"]),
    adapter("factor-1d-lora-b", on_tensor(f"{Q}.lora_b", dims=(128,)), [f"{Q}.lora_b", "matrix"]),
    adapter("factor-3d-lora-a", on_tensor(f"{Q}.lora_a", dims=(32, 4, 1)), [f"{Q}.lora_a", "matrix"]),
    adapter("factor-zero-rank", on_tensor(f"{Q}.lora_a", dims=(32, 0), data=b""), [f"{Q}.lora_a", "matrix"]),
    adapter("factor-5-dims", on_tensor(f"{Q}.lora_a", dims=(32, 4, 1, 1, 1)), [f"{Q}.lora_a", "5 dimensions"]),
    adapter(
        "factor-nan",  # validate reports it as a finding under the report line that names the file
        _first_value(f"{Q}.lora_b", struct.pack("<f", NAN)),
        ["q_proj.lora_B", "NaN"],
        ("info", "convert", "merge", "merge-gguf"),
    ),
    # structure
    adapter("pair-missing-half", _drop_tensor(f"{Q}.lora_b"), [f"{Q}.lora_b"]),
    adapter(
        "tensor-unexpected",
        _add_tensor(RawTensor("blk.0.attn_q.weight.extra", (4,), 0, bytes(16))),
        ["blk.0.attn_q.weight.extra"],
    ),
    adapter(
        "tensor-duplicate", _add_tensor(RawTensor(f"{Q}.lora_a", (32, 4), 0, bytes(512))), [f"{Q}.lora_a", "twice"]
    ),
    adapter("key-duplicate", lambda r: r.kv.append(r.kv[r.index("adapter.type")]), ["adapter.type", "twice"]),
    adapter("value-type-unknown", put("general.junk", 13, b""), ["general.junk", "unknown value type"]),
    adapter("array-type-unknown", put("general.junk", ARR, struct.pack("<IQ", 77, 1) + bytes(8)), ["general.junk"]),
    adapter("alignment-zero", setv("general.alignment", U32, 0), ["general.alignment"]),
    adapter("alignment-odd", setv("general.alignment", U32, 24), ["general.alignment"]),
    adapter("alignment-string", setv("general.alignment", STR, "32"), ["general.alignment"]),
    adapter("version-1", attr(version=1), ["version 1"]),
    adapter("version-99", attr(version=99), ["version 99"]),
    adapter("big-endian", attr(header_hook=_big_endian), ["big-endian"]),
    adapter("truncated-header", attr(cut=40), []),
    adapter("truncated-in-tensor-infos", lambda r: setattr(r, "cut", r.encode().index(text(f"{Q}.lora_a")) + 20), []),
    # aLoRA invocation tokens
    adapter("tokens-string", setv("adapter.alora.invocation_tokens", STR, "1,2"), ["invocation_tokens"]),
    adapter("tokens-negative", put("adapter.alora.invocation_tokens", ARR, array(I32, [5, -1])), ["invocation_tokens"]),
    adapter("tokens-float", put("adapter.alora.invocation_tokens", ARR, array(F32, [5.0])), ["invocation_tokens"]),
    # damaged GGUF bases (merge into them, validate and info against them)
    base("nan-weight", _first_value(Q, struct.pack("<f", NAN)), [Q, "NaN"], ("merge",)),
    base(
        "inf-weight", _first_value("blk.1.ffn_up.weight", struct.pack("<f", INF)), ["ffn_up", "NaN or Inf"], ("merge",)
    ),
    base("q8-nan-scale", _first_value(Q, struct.pack("<H", 0x7E00)), [Q, "NaN"], ("merge",), source=GGUF_Q8),
    base("huge-tokens", put("tokenizer.ggml.tokens", ARR, array(STR, [], GIANT)), ["tokenizer.ggml.tokens"]),
    base("huge-block-count", setv("llama.block_count", U32, (1 << 31) - 1), ["llama.block_count"]),
    # one tensor info fewer than the file holds: the data section was taken to start inside the last info, every
    # tensor read shifted (validate and info took the base; probe4)
    base("tensor-count-short", attr(header_hook=_one_tensor_fewer), ["tensor infos end at byte", "non-zero bytes"]),
    adapter("tensor-count-short", attr(header_hook=_one_tensor_fewer), ["tensor infos end at byte", "non-zero bytes"]),
    # said "not a checkpoint (expected .safetensors or a model folder)" (probe4)
    base("bad-magic", attr(header_hook=lambda h: b"GGUX" + h[4:]), ["not a GGUF file", "GGUX"]),
    base("blocks-beyond-tensors", setv("llama.block_count", U32, 30), ["llama.block_count"]),
    base("blocks-too-few", setv("llama.block_count", U32, 1), ["llama.block_count"]),
    base("blocks-missing", lambda r: r.drop("llama.block_count"), ["llama.block_count"]),
    base("heads-zero", setv("llama.attention.head_count", U32, 0), ["llama.attention.head_count"]),
    base("heads-negative", setv("llama.attention.head_count", I32, -1), ["llama.attention.head_count"]),
    base("heads-rows-do-not-split", setv("llama.attention.head_count", U32, 6), ["llama.attention.head_count"]),
    base("heads-kv-not-dividing", setv("llama.attention.head_count_kv", U32, 3), ["head_count_kv"]),
    base("overlap", _share_offset("blk.0.attn_output.weight", Q), ["share bytes", Q]),
    base("truncated", attr(cut=-1000), ["past the end"]),
    base("utf8-architecture", put("general.architecture", STR, text(b"ll\xffama")), ["general.architecture"]),
    base("tensor-type-unknown", on_tensor(Q, type=200), [Q, "unknown tensor type"]),
]


def _hf_base_config(**values: object) -> Callable[[Path], Path]:
    """fixtures/bases/llama with config.json values replaced: the Hugging Face base of ``convert --to gguf``."""

    def build(folder: Path) -> Path:
        import json
        import shutil

        out = folder / "llama-hf"
        shutil.copytree(FIXTURES / "bases" / "llama", out)
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(values)
        (out / "config.json").write_text(json.dumps(cfg))
        return out

    return build


#: convert --to gguf against a Hugging Face folder whose head count is a string ("config.json has no
#: num_attention_heads" before; probe4)
CASES.append(
    HostileCase(
        "gguf-hf-base-heads-string",
        _hf_base_config(num_attention_heads="4"),
        ["config.json num_attention_heads is '4', not an integer"],
        {"convert-gguf": ["convert", LLAMA_LORA, "--to", "gguf", "--base", "B", "-o", "O"]},
    )
)
