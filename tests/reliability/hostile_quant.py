"""Hostile quantized bases (issue 19, section 3): broken bitsandbytes 4/8-bit, FP8, GPTQ and AWQ quant states.

Every case starts from a valid tiny quantized Llama built here, in the test's folder: ``bases/llama-bnb-nf4``
(transformers + bitsandbytes' own save) as it is, or without double quantization; 8-bit, FP8, GPTQ and AWQ
made from ``bases/llama`` in their on-disk layouts. One thing is then broken: a NaN in a quant-state tensor
(``data`` cases: only reading the values finds it, so ``info`` is not run), or a shape, dtype or setting that
disagrees with the weight (``header`` cases: every command refuses at open). Each runs through the merge
paths (16-bit, ``--requantize`` where the scheme has it, ``--reference``) and ``validate --base``.

:func:`fuzz_base` is the seeded fuzzer over the same states (JSON fields, tensor shapes and dtypes):
tests/quant/test_quant_fuzz.py drives it.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from hostile import HostileCase
from reliability_support import FIXTURES, LLAMA_BASE, LLAMA_LORA

NF4_FIXTURE = FIXTURES / "bases" / "llama-bnb-nf4"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q = "model.layers.0.self_attn.q_proj.weight"  # the adapter touches q/v/up/down
K = "model.layers.0.self_attn.k_proj.weight"  # ... but not k: an untouched module must be checked too
D = "model.layers.1.mlp.down_proj.weight"
STATE = ".quant_state.bitsandbytes__nf4"
Tensors = dict[str, torch.Tensor]

MERGE = ["merge", "B", LLAMA_LORA, "-o", "O"]
DATA_COMMANDS = {
    "merge": MERGE,
    "merge-reference": [*MERGE, "--reference", LLAMA_BASE],
    "validate": ["validate", LLAMA_LORA, "--base", "B"],
}
REQUANTIZE = {"merge-requantize": [*MERGE, "--requantize"]}
HEADER_COMMANDS = {**DATA_COMMANDS, "info": ["info", LLAMA_LORA, "--base", "B"]}


# -- valid sources ----------------------------------------------------------------------------------
def _load(path: Path) -> Tensors:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save(folder: Path, tensors: Tensors, config: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def _llama16() -> tuple[Tensors, dict]:
    return _load(LLAMA_BASE / "model.safetensors"), json.loads((LLAMA_BASE / "config.json").read_text())


def _linear(key: str) -> bool:
    return key.endswith(".weight") and key.split(".")[-2] in LINEAR


def _state(t: Tensors, key: str) -> dict:
    return json.loads(bytes(t[key + STATE].numpy()).decode())


def _put_state(t: Tensors, key: str, doc: object, raw: bytes | None = None) -> None:
    data = raw if raw is not None else json.dumps(doc).encode()
    t[key + STATE] = torch.tensor(list(data), dtype=torch.uint8)


def nf4(_: Tensors | None = None) -> tuple[Tensors, dict]:
    """transformers' own nf4 save with double quantization (the fixture)."""
    return _load(NF4_FIXTURE / "model.safetensors"), json.loads((NF4_FIXTURE / "config.json").read_text())


def nf4_plain() -> tuple[Tensors, dict]:
    """The fixture with its absmax resolved to fp32 (bnb_4bit_use_double_quant=False's layout)."""
    from loratools.checkpoint.quant import bnb

    t, cfg = nf4()
    for key in [k for k in t if k.endswith(STATE)]:
        w = key[: -len(STATE)]
        doc = _state(t, w)
        state = bnb.parse_state(t[key], key)
        nested = t.pop(f"{w}.nested_absmax"), t.pop(f"{w}.nested_quant_map")
        t[f"{w}.absmax"] = bnb.nested_absmax(state, t[f"{w}.absmax"], *nested)
        for field in ("nested_blocksize", "nested_dtype", "nested_offset"):
            doc.pop(field, None)
        _put_state(t, w, doc)
    cfg["quantization_config"]["bnb_4bit_use_double_quant"] = False
    return t, cfg


def int8() -> tuple[Tensors, dict]:
    """LLM.int8 row-wise (bitsandbytes' Int8Params layout: int8 weight + fp32 SCB)."""
    from loratools.checkpoint.quant.bnb import quantize_int8

    t, cfg = _llama16()
    for k in [k for k in t if _linear(k)]:
        t[k], t[k[: -len("weight")] + "SCB"] = quantize_int8(t[k].to(torch.float16))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    return t, cfg


def fp8(block: list[int] | None = (16, 16)) -> tuple[Tensors, dict]:
    """float8_e4m3fn weights, fp32 ``weight_scale_inv`` per 16×16 tile (transformers' FineGrainedFP8 layout)."""
    from loratools.checkpoint.quant.fp8 import quantize

    t, cfg = _llama16()
    for k in [k for k in t if _linear(k)]:
        t[k], t[k + "_scale_inv"] = quantize(t[k].float(), tuple(block) if block else None, torch.float32)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block) if block else None}  # fmt: skip
    return t, cfg


def _groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scales and integer zeros per input group: (in/group, out) each."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-5)
    return scales.T.contiguous(), torch.round(-lo / scales).clamp(0, 15).T.contiguous()


def _words(codes: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """4-bit codes packed 8 to an int32 word along ``dim`` (word j holds ``order[j]`` of its 8)."""
    c = codes.to(torch.int64).movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], -1, 8)[..., list(order)]
    words = sum(c[..., i] << (4 * i) for i in range(8))
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32).movedim(-1, dim).contiguous()


def int_packed(method: str) -> tuple[Tensors, dict]:
    """GPTQ (v1 zeros, no act-order) or AWQ GEMM, 4-bit, group 16, fp16 scales."""
    t, cfg = _llama16()
    for k in [k for k in t if _linear(k)]:
        w = t.pop(k).float()
        scales, zeros = _groups(w, 16)
        g = torch.arange(w.shape[1]) // 16
        q = torch.clamp(torch.round(w.T / scales[g] + zeros[g]), 0, 15)  # (in, out)
        m = k[: -len(".weight")]
        if method == "gptq":
            t[f"{m}.qweight"], t[f"{m}.qzeros"] = _words(q, 0), _words(zeros - 1, 1)
            t[f"{m}.g_idx"] = g.to(torch.int32)
        else:
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            t[f"{m}.qweight"], t[f"{m}.qzeros"] = _words(q, 1, order), _words(zeros, 1, order)
        t[f"{m}.scales"] = scales.half()
    for k in t:
        t[k] = t[k].half() if t[k].is_floating_point() else t[k]
    qcfg = {"bits": 4, "group_size": 16}
    qcfg.update({"desc_act": False, "sym": False, "checkpoint_format": "gptq"} if method == "gptq" else
                {"zero_point": True, "version": "gemm"})  # fmt: skip
    cfg.update(quantization_config={"quant_method": method, **qcfg}, dtype="float16")
    return t, cfg


SOURCES: dict[str, Callable[[], tuple[Tensors, dict]]] = {
    "nf4": nf4,
    "nf4plain": nf4_plain,
    "int8": int8,
    "fp8": fp8,
    "gptq": lambda: int_packed("gptq"),
    "awq": lambda: int_packed("awq"),
}
REQUANTIZABLE = ("nf4", "nf4plain", "int8", "fp8")


# -- cases ------------------------------------------------------------------------------------------
def _builder(name: str, source: str, edit: Callable[[Tensors, dict], None]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        t, cfg = SOURCES[source]()
        edit(t, cfg)
        return _save(folder / f"base-{name}", t, cfg)

    return build


CASES: list[HostileCase] = []


def case(name: str, source: str, expect: list[str], *, data: bool = False, weights: bool = False) -> Callable:
    """Register ``edit(tensors, config)`` as hostile case ``quant-<name>`` on a ``source`` base. ``data``:
    found by reading values (not by ``info``); ``weights``: only in the packed weight, which ``validate``
    does not read (a merge dequantizes it)."""

    def register(edit: Callable[[Tensors, dict], None]) -> Callable:
        commands = dict(DATA_COMMANDS if data else HEADER_COMMANDS)
        if weights:
            del commands["validate"]
        if source in REQUANTIZABLE:
            commands.update(REQUANTIZE)
        CASES.append(
            HostileCase(f"quant-{name}", _builder(name, source, edit), expect, commands, validate_exit=1 if data else 2)
        )
        return edit

    return register


def _set(key: str, index: int | tuple, value: float) -> Callable[[Tensors, dict], None]:
    def edit(t: Tensors, _: dict) -> None:
        x = t[key].clone()
        x.view(-1)[index] = value
        t[key] = x

    return edit


def _resize(key: str, numel: int | None = None, shape: tuple | None = None, dtype=None) -> Callable:  # noqa: ANN001
    def edit(t: Tensors, _: dict) -> None:
        x = t[key].reshape(-1)
        n = numel if numel is not None else math.prod(shape)
        x = x.repeat(n // x.numel() + 1)[:n] if n else x[:0]
        x = x.reshape(shape) if shape is not None else x
        t[key] = x.to(dtype) if dtype is not None else x

    return edit


def _register_all() -> None:
    nan = math.nan
    # NaN/Inf in a quant-state tensor: merged silently into NaN weights before (issue 19)
    for name, source, key, value in [
        ("nan-quant-map", "nf4", f"{Q}.quant_map", nan),
        ("inf-quant-map-untouched", "nf4", f"{K}.quant_map", math.inf),
        ("nan-quant-map-first-code", "nf4", f"{D}.quant_map", nan),
        ("nan-nested-absmax", "nf4", f"{Q}.nested_absmax", nan),
        ("nan-nested-quant-map", "nf4", f"{Q}.nested_quant_map", nan),
        ("nan-absmax-plain", "nf4plain", f"{Q}.absmax", nan),
        ("inf-absmax-plain-untouched", "nf4plain", f"{K}.absmax", -math.inf),
        ("nan-scb", "int8", f"{Q[: -len('weight')]}SCB", nan),
        ("nan-scale-inv", "fp8", f"{Q}_scale_inv", nan),
        ("inf-scale-inv-untouched", "fp8", f"{K}_scale_inv", math.inf),
        ("nan-gptq-scales", "gptq", Q.replace(".weight", ".scales"), nan),
        ("inf-awq-scales-untouched", "awq", K.replace(".weight", ".scales"), math.inf),
    ]:
        case(name, source, [key], data=True)(_set(key, 0 if "first" in name else -1, value))

    @case("nan-fp8-weight-code", "fp8", [Q, "NaN"], data=True, weights=True)
    def _(t: Tensors, _: dict) -> None:  # float8_e4m3fn 0x7f is NaN: the dequantized weight holds it
        x = t[Q].view(torch.uint8).clone()
        x[3, 5] = 0x7F
        t[Q] = x.view(torch.float8_e4m3fn)

    @case("inf-fp8-overflow", "fp8", [K + "_scale_inv", "range"], data=True)
    def _(t: Tensors, _: dict) -> None:  # a finite scale that overflows fp32: 448 × 1e38
        t[K + "_scale_inv"] = torch.full_like(t[K + "_scale_inv"], 1e38)

    @case("fp8-negative-scale-untouched", "fp8", [K + "_scale_inv", "negative"], data=True)
    def _(t: Tensors, _: dict) -> None:  # no quantizer writes scale_inv < 0: the weights would flip sign silently
        t[K + "_scale_inv"] = -t[K + "_scale_inv"]

    @case("fp8-zero-scales", "fp8", [Q + "_scale_inv", "all zeros"], data=True)
    def _(t: Tensors, _: dict) -> None:  # every scale 0: the whole weight would dequantize to 0, silently
        t[Q + "_scale_inv"] = torch.zeros_like(t[Q + "_scale_inv"])

    for method in ("gptq", "awq"):
        scales = Q.replace(".weight", ".scales")

        @case(f"{method}-negative-scale", method, [scales, "negative"], data=True)
        def _(t: Tensors, _: dict, scales: str = scales) -> None:  # (max - min) / 15 is never < 0
            t[scales] = t[scales].clone()
            t[scales].view(-1)[3] *= -1

    @case("inf-nf4-fp16-overflow", "nf4plain", [f"{Q}.absmax", "range"], data=True)
    def _(t: Tensors, _: dict) -> None:  # absmax 1e30 in an fp16 state: finite in fp32, Inf once cast
        t[f"{Q}.absmax"] = torch.full_like(t[f"{Q}.absmax"], 1e30)
        _put_state(t, Q, {**_state(t, Q), "dtype": "float16"})

    @case("nan-gptq-g-idx-range", "gptq", [Q.replace(".weight", ".g_idx")], data=True)
    def _(t: Tensors, _: dict) -> None:
        t[Q.replace(".weight", ".g_idx")] = t[Q.replace(".weight", ".g_idx")] + 7

    for value, label in [(nan, "nan"), (math.inf, "inf"), (-math.inf, "neginf")]:

        @case(f"nested-offset-{label}", "nf4", [Q, "nested_offset"])
        def _(t: Tensors, _: dict, value: float = value) -> None:
            _put_state(t, Q, {**_state(t, Q), "nested_offset": value})

    # shapes and dtypes of bnb 4-bit parts that disagree with the weight
    for name, key, kw in [
        ("quant-map-32", f"{Q}.quant_map", {"numel": 32}),
        ("quant-map-8", f"{Q}.quant_map", {"numel": 8}),
        ("absmax-3x", f"{Q}.absmax", {"numel": 48}),
        ("absmax-short", f"{Q}.absmax", {"numel": 3}),
        ("absmax-float-nested", f"{Q}.absmax", {"numel": 16, "dtype": torch.float32}),
        ("nested-map-16", f"{Q}.nested_quant_map", {"numel": 16}),
        ("nested-absmax-long", f"{Q}.nested_absmax", {"numel": 3}),
        ("nested-absmax-empty", f"{D}.nested_absmax", {"numel": 0}),
        ("packed-short", Q, {"shape": (256, 1)}),
        ("packed-long", Q, {"shape": (1024, 1)}),
        ("packed-f32-same-count", Q, {"shape": (512, 1), "dtype": torch.float32}),
    ]:
        case(f"nf4-{name}", "nf4", [key.rsplit(".", 1)[0] if key != Q else Q])(_resize(key, **kw))

    @case("nf4-packed-f32-same-bytes", "nf4", [Q, "F32"])
    def _(t: Tensors, _: dict) -> None:  # the right byte count, but not the config's quant storage (uint8)
        t[Q] = t[Q].reshape(-1).view(torch.float32).reshape(-1, 1)

    case("nf4plain-absmax-3x", "nf4plain", [f"{Q}.absmax"])(_resize(f"{Q}.absmax", numel=48))
    case("nf4plain-absmax-u8", "nf4plain", [f"{Q}.absmax"])(_resize(f"{Q}.absmax", numel=16, dtype=torch.uint8))

    # the 4-bit state JSON
    for name, change, want in [
        ("nested-blocksize-0", {"nested_blocksize": 0}, "nested_blocksize"),
        ("nested-blocksize-neg", {"nested_blocksize": -256}, "nested_blocksize"),
        ("nested-blocksize-str", {"nested_blocksize": "big"}, "nested_blocksize"),
        ("blocksize-0", {"blocksize": 0}, "blocksize"),
        ("blocksize-float", {"blocksize": 64.5}, "blocksize"),
        ("shape-1d-wrong", {"shape": [32]}, "shape"),
        ("shape-negative", {"shape": [-32, -32]}, "shape"),
        ("shape-huge", {"shape": [2**40, 2**40]}, "shape"),
        ("shape-str", {"shape": "32x32"}, "shape"),
        ("quant-type-nf5", {"quant_type": "nf5"}, "quant_type"),
        ("quant-type-disagrees", {"quant_type": "fp4"}, "quant_type"),
        ("dtype-int", {"dtype": "int8"}, "dtype"),
        ("nested-dtype-int", {"nested_dtype": "uint8"}, "nested_dtype"),
    ]:

        @case(f"nf4-state-{name}", "nf4", [Q, want])
        def _(t: Tensors, _: dict, change: dict = change) -> None:
            _put_state(t, Q, {**_state(t, Q), **change})

    for name, raw in [
        ("deep-json", b"[" * 100_000 + b"]" * 100_000),
        ("deep-dict", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        ("not-json", b"\xff\xfe garbage"),
        ("json-list", b"[1, 2, 3]"),
        ("missing-shape", json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16"}).encode()),
    ]:

        @case(f"nf4-state-{name}", "nf4", [Q, "quant state"])
        def _(t: Tensors, _: dict, raw: bytes = raw) -> None:
            _put_state(t, Q, None, raw)

    # bitsandbytes 8-bit
    scb = Q[: -len("weight")] + "SCB"
    case("int8-scb-one", "int8", [scb])(_resize(scb, numel=1))
    case("int8-scb-short", "int8", [scb])(_resize(scb, numel=31))
    case("int8-scb-2d", "int8", [scb])(_resize(scb, shape=(32, 2)))
    case("int8-scb-int", "int8", [scb])(_resize(scb, numel=32, dtype=torch.int32))
    case("int8-weight-1d", "int8", [Q])(_resize(Q, numel=1024, dtype=torch.int8))
    case("int8-weight-f16", "int8", [Q, "F16"])(_resize(Q, shape=(32, 32), dtype=torch.float16))

    # FP8
    for name, block in [("zero", [0, 0]), ("one-entry", [16]), ("str", ["a", 16]), ("negative", [-16, 16]),
                        ("float", [16.5, 16])]:  # fmt: skip

        @case(f"fp8-block-{name}", "fp8", ["config.json", "weight_block_size"])
        def _(_: Tensors, cfg: dict, block: list = block) -> None:
            cfg["quantization_config"]["weight_block_size"] = block

    case("fp8-grid-wrong", "fp8", [f"{Q}_scale_inv"])(_resize(f"{Q}_scale_inv", shape=(3, 3)))
    case("fp8-grid-1d", "fp8", [f"{Q}_scale_inv"])(_resize(f"{Q}_scale_inv", numel=4))
    case("fp8-weight-1d", "fp8", [Q])(_resize(Q, numel=1024))
    case("fp8-weight-f16", "fp8", [Q, "F16"])(_resize(Q, shape=(1025, 1), dtype=torch.float16))  # found by the fuzzer

    experts = "model.layers.0.mlp.experts.gate_up_proj"

    @case("fp8-experts-no-scale", "fp8", [experts, "_scale_inv"])
    def _(t: Tensors, _: dict) -> None:  # a 3-D FP8 expert tensor without its scale was read as plain bytes
        t[experts] = torch.zeros(2, 16, 32).to(torch.float8_e4m3fn)

    @case("fp8-scale-f8", "fp8", [f"{Q}_scale_inv"])
    def _(t: Tensors, _: dict) -> None:
        t[f"{Q}_scale_inv"] = t[f"{Q}_scale_inv"].to(torch.float8_e4m3fn)

    # GPTQ and AWQ settings and parts
    for method in ("gptq", "awq"):
        for name, field, value in [("bits-0", "bits", 0), ("bits-str", "bits", "four"), ("bits-3", "bits", 3),
                                   ("bits-bool", "bits", True), ("group-neg", "group_size", -5),
                                   ("group-0", "group_size", 0), ("group-str", "group_size", "16")]:  # fmt: skip

            @case(f"{method}-{name}", method, ["config.json", field])
            def _(_: Tensors, cfg: dict, field: str = field, value: object = value) -> None:
                cfg["quantization_config"][field] = value

        m = Q[: -len(".weight")]
        case(f"{method}-qweight-1d", method, [f"{m}.qweight"])(_resize(f"{m}.qweight", numel=128))
        case(f"{method}-qweight-f16", method, [f"{m}.qweight"])(_resize(f"{m}.qweight", numel=128,
             shape=(4, 32) if method == "gptq" else (32, 4), dtype=torch.float16))  # fmt: skip
        case(f"{method}-scales-one-col", method, [f"{m}.scales"])(_resize(f"{m}.scales", shape=(2, 1)))
        case(f"{method}-scales-few-cols", method, [f"{m}.scales"])(_resize(f"{m}.scales", shape=(2, 24)))
        case(f"{method}-scales-few-rows", method, [f"{m}.scales"])(_resize(f"{m}.scales", shape=(1, 32)))
        case(f"{method}-qzeros-few-rows", method, [f"{m}.qzeros"])(_resize(f"{m}.qzeros", shape=(1, 4)))
        case(f"{method}-qzeros-few-cols", method, [f"{m}.qzeros"])(_resize(f"{m}.qzeros", shape=(2, 1)))
    m = Q[: -len(".weight")]
    case("gptq-g-idx-short", "gptq", [f"{m}.g_idx"])(_resize(f"{m}.g_idx", numel=5))
    case("gptq-g-idx-float", "gptq", [f"{m}.g_idx"])(_resize(f"{m}.g_idx", numel=32, dtype=torch.float32))


_register_all()


# -- the seeded fuzzer ------------------------------------------------------------------------------
JSON_VALUES = [0, -1, 1, 3, 7, 2**31, 2**63, -(2**40), 0.5, math.nan, math.inf, "", "x", "64", None, True,
               [], [0], [16, 16], [0, 0], [-1, 1], {}, {"a": 1}, [[[]]]]  # fmt: skip
DTYPES = [torch.uint8, torch.int8, torch.int32, torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]


def _any_value(rng: random.Random) -> object:
    return rng.choice(JSON_VALUES)


def fuzz_base(seed: int, folder: Path) -> tuple[str, Path]:
    """A valid quantized base of a random scheme with 1-3 random changes to its quant state: a JSON field
    (the 4-bit state or quantization_config) set to a hostile value, or a tensor given another shape,
    element count or dtype, or NaN/Inf written into it. Returns (scheme source, folder)."""
    rng = random.Random(seed)
    source = rng.choice(sorted(SOURCES))
    t, cfg = SOURCES[source]()
    quantized = sorted({k for k in t if not k.startswith(("model.embed", "model.norm", "lm_head"))
                        and ".layernorm" not in k and "_layernorm" not in k})  # fmt: skip
    for _ in range(rng.randint(1, 3)):
        action = rng.choice(["config", "state", "shape", "dtype", "value"])
        if action == "config":
            qcfg = cfg["quantization_config"]
            field = rng.choice([*sorted(qcfg), "weight_block_size", "bits", "group_size"])
            qcfg[field] = _any_value(rng)
        elif action == "state" and any(k.endswith(STATE) for k in t):
            key = rng.choice([k for k in t if k.endswith(STATE)])[: -len(STATE)]
            try:
                doc = _state(t, key)
            except ValueError:  # broken by an earlier change of this seed
                continue
            if not isinstance(doc, dict):
                continue
            doc[rng.choice([*sorted(doc), "nested_offset", "nested_blocksize"])] = _any_value(rng)
            _put_state(t, key, doc)
        else:
            key = rng.choice(quantized)
            x = t[key]
            if action == "shape":
                n = max(0, x.numel() + rng.choice([-x.numel(), -1, 1, x.numel(), 2 * x.numel(), 7]))
                shape = rng.choice([(n,), (1, n), (n, 1)] + ([(n // 2, 2)] if n % 2 == 0 else []))
                t[key] = _reshaped(x, shape)
            elif action == "dtype":
                t[key] = _cast(x, rng.choice(DTYPES))
            elif x.is_floating_point() and x.numel():
                x = x.clone()
                x.view(-1)[rng.randrange(x.numel())] = rng.choice([math.nan, math.inf, -math.inf, 1e38, -1e38])
                t[key] = x
    return source, _save(folder / f"fuzz-{seed}", t, cfg)


def _reshaped(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    flat = x.reshape(-1)
    n = math.prod(shape)
    return (flat.repeat(n // max(1, flat.numel()) + 1)[:n] if flat.numel() else torch.zeros(n, dtype=x.dtype)).reshape(
        shape
    )


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype == dtype:
        return x
    if x.is_floating_point() or dtype.is_floating_point:
        return x.float().clamp(-400, 400).to(dtype) if dtype == torch.float8_e4m3fn else x.to(dtype)
    return x.to(dtype)


def copy_fixture(folder: Path) -> Path:
    """The nf4 fixture itself (a control: it merges)."""
    return Path(shutil.copytree(NF4_FIXTURE, folder / "nf4"))


__all__ = ["CASES", "SOURCES", "copy_fixture", "fuzz_base"]
