"""Seeds and mutators for the fuzz tests: valid inputs in memory, hostile variants drawn by hypothesis.

Every mutator returns bytes or JSON text; the tests write them to a temporary folder and call the
readers directly. Mutations cover the byte level (flips, truncation, a lying length prefix) and the
structure (dtypes, shapes, offsets, key names, metadata, config values).
"""

from __future__ import annotations

import json
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from hypothesis import strategies as st
from safetensors.torch import save

from loratools.errors import LoratoolsError

PEFT_PREFIX = "base_model.model.model.layers."
DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "I64", "I32", "I8", "U8", "BOOL", "F12", "Q4_0", "", None, 7]
INTS = st.one_of(
    st.integers(-4, 70),
    st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**47, 2**48, 2**63, 2**64 + 5, -(2**63)]),
)
KEY_PARTS = ["lora_A", "lora_B", "weight", "lora_down", "lora_up", "alpha", "unet", "lora_unet_x", "0", "", "..", "€"]


class Hang(Exception):
    """A reader ran past its time budget (not a LoratoolsError, so the test fails)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread when the block runs longer than ``seconds``."""

    def fire(*_: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


#: a call that runs this long is a hang (an endless loop), not a slow machine: generous on purpose
HANG_S = 300.0


def only_loratools_errors(fn: Callable[[], Any], seconds: float = HANG_S) -> None:
    """Run ``fn``: success or a LoratoolsError are fine, anything else (or a hang) fails the test."""
    try:
        with time_limit(seconds):
            fn()
    except LoratoolsError:
        pass


def tensors(seed: int, names: list[str], rank: int = 2, width: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        shape = (rank, width) if any(x in n for x in ("lora_A", "lora_down")) else (width, rank)
        out[n] = torch.randn(shape, generator=g) if "alpha" not in n else torch.tensor(4.0)
    return out


def peft_names(layers: int = 2) -> list[str]:
    return [f"{PEFT_PREFIX}{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(layers) for ab in "AB"]


def kohya_names() -> list[str]:
    names = []
    for i in range(2):
        base = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        names += [f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"]
    return names


def diffusers_names() -> list[str]:
    return [f"unet.down_blocks.0.attentions.0.proj_in.lora_{ab}.weight" for ab in "AB"] + [
        f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_{ab}.weight" for ab in "AB"
    ]


def st_bytes(ts: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save(ts, metadata=metadata)


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: Any, body: bytes, lie: int | None = None) -> bytes:
    hb = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(hb) if lie is None else lie % 2**64) + hb + body


# strategies are built once: hypothesis validates each new strategy object, which dominates run time
_PICK = st.integers(0, 2**16)
_KIND = st.sampled_from(["entry", "entry", "rename", "meta", "bytes", "truncate", "lie", "raw"])
_FIELD = st.sampled_from(["dtype", "shape", "data_offsets", "all", "drop"])
_DTYPE = st.sampled_from(DTYPES)
_SHAPE = st.one_of(st.lists(INTS, max_size=10), st.just("8"), st.none())
_OFFSETS = st.one_of(st.lists(INTS, min_size=0, max_size=3), st.just({}))
_ENTRY = st.sampled_from([None, [], "x", 3, {}])
_PARTS = st.lists(st.sampled_from(KEY_PARTS), min_size=0, max_size=5)
_PART = st.sampled_from(KEY_PARTS)
_META = st.one_of(
    st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=20), st.integers()), max_size=3),
    st.just({"loratools": "{" * 3000}),
    st.just({"lora_adapter_metadata": '{"unet.r": "x", "unet.lora_alpha": [1]}'}),
    st.just({"lora_adapter_metadata": '{"unet.alpha_pattern": [1], "text_encoder.lora_alpha": "7"}'}),
    st.just({"ss_network_dim": "-3", "ss_network_alpha": "nan"}),
    st.sampled_from([None, [], "x"]),
)
_FLIPS = st.lists(st.tuples(_PICK, st.integers(0, 255)), min_size=1, max_size=8)
_RAW = st.binary(max_size=64)
_BOOL = st.booleans()
_JSON_KIND = st.sampled_from(["value", "value", "drop", "text", "nest", "type"])
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.text(max_size=6), max_size=3),
    st.dictionaries(st.text(max_size=12), st.one_of(INTS, st.text(max_size=6), st.none()), max_size=3),
)
_TAIL = st.text(max_size=6)
_DEPTH = st.integers(500, 5000)


@st.composite
def mutated_safetensors(draw: st.DrawFn, seed: bytes) -> bytes:
    """A valid file with structural or byte-level damage."""
    header, body = split(seed)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(_KIND)
    if kind == "entry":
        name = names[draw(_PICK) % len(names)]
        field = draw(_FIELD)
        entry = dict(header[name])
        if field in ("dtype", "all"):
            entry["dtype"] = draw(_DTYPE)
        if field in ("shape", "all"):
            entry["shape"] = draw(_SHAPE)
        if field in ("data_offsets", "all"):
            entry["data_offsets"] = draw(_OFFSETS)
        if field == "drop":
            entry = draw(_ENTRY)
        header[name] = entry
        return join(header, body[: draw(_PICK) % (len(body) + 1)] if draw(_BOOL) else body)
    if kind == "rename":
        old = names[draw(_PICK) % len(names)]
        new = ".".join(draw(_PARTS)) if draw(_BOOL) else old.replace("lora_", draw(_PART))
        header[new] = header.pop(old)
        return join(header, body)
    if kind == "meta":
        header["__metadata__"] = draw(_META)
        return join(header, body)
    raw = bytearray(seed)
    if kind == "bytes":
        n = struct.unpack("<Q", seed[:8])[0]
        for pos, val in draw(_FLIPS):
            raw[pos % (n + 8)] = val
        return bytes(raw)
    if kind == "truncate":
        return bytes(raw[: draw(_PICK) % len(raw)])
    if kind == "lie":
        return join(json.dumps(header).encode(), body, lie=draw(INTS))
    return join(draw(_RAW), body, lie=None if draw(_BOOL) else draw(INTS))


@st.composite
def mutated_json(draw: st.DrawFn, seed: dict) -> str:
    """A JSON document (config, index) with values replaced, keys dropped, or not JSON at all."""
    doc = json.loads(json.dumps(seed))
    keys = sorted(doc)
    kind = draw(_JSON_KIND)
    if kind == "value" and keys:
        doc[keys[draw(_PICK) % len(keys)]] = draw(_JUNK)
    elif kind == "drop" and keys:
        doc.pop(keys[draw(_PICK) % len(keys)])
    elif kind == "text":
        text = json.dumps(doc)
        return text[: draw(_PICK) % (len(text) + 1)] + draw(_TAIL)
    elif kind == "nest":
        return "[" * draw(_DEPTH) + "]" * 10
    else:
        return json.dumps(draw(_JUNK))
    return json.dumps(doc, allow_nan=True)
