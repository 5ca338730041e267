"""Hostile GGUF diffusion checkpoints (issue 21 item 3): the tiny Flux fixture (fixtures/dit/flux, names without
``model.diffusion_model.``, as ComfyUI-GGUF's convert.py strips it) written as a ComfyUI-GGUF file
(``general.architecture`` flux, blocks' 2-D weights Q8_0 where their rows fit, F16 otherwise, 1-D F32), broken in
one place each, merged with the fixture's kohya LoRA.

Header cases are found when the file is opened; value cases (a NaN block scale in a tensor the LoRA touches) when
the touched tensor is decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hostile import HostileCase
from reliability_support import FIXTURES

FLUX = FIXTURES / "dit" / "flux"
LORA = FLUX / "kohya-lora.safetensors"
QKV = "double_blocks.0.img_attn.qkv.weight"  # touched by the LoRA (F16: its rows are no whole Q8_0 block)
MLP2 = "double_blocks.0.img_mlp.2.weight"  # touched by the LoRA (Q8_0: 32 values a row)
COMMANDS = {"merge": ["merge", "B", LORA, "-o", "O"]}
#: a damaged header is refused wherever the file is opened as a base (values are read only by merge)
BASE_COMMANDS = {"validate": ["validate", LORA, "--base", "B"], "info": ["info", LORA, "--base", "B"]}
Tensors = dict[str, np.ndarray]


def tensors() -> Tensors:
    from safetensors.torch import load_file

    return {k.removeprefix("model.diffusion_model."): v.float().numpy()
            for k, v in load_file(str(FLUX / "flux1-tiny.safetensors")).items()}  # fmt: skip


def _type(name: str, v: np.ndarray) -> str:
    if v.ndim == 1:
        return "F32"
    return "Q8_0" if name.startswith(("double_blocks", "single_blocks")) and v.shape[-1] % 32 == 0 else "F16"


def write(path: Path, t: Tensors, types: dict[str, str] | None = None, extra: Callable | None = None) -> Path:
    import gguf

    w = gguf.GGUFWriter(path=None, arch="flux")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if extra is not None:
        extra(w)
    for name, v in t.items():
        kind = (types or {}).get(name) or _type(name, v)
        qtype = gguf.GGMLQuantizationType[kind]
        w.add_tensor(name, gguf.quants.quantize(v, qtype), raw_dtype=qtype)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CASES: list[HostileCase] = []


def case(name: str, expect: list[str], header: bool = True) -> Callable:
    def register(make: Callable[[Path], Path]) -> Callable:
        def build(folder: Path) -> Path:
            folder.mkdir(parents=True, exist_ok=True)
            return make(folder / f"flux-Q8_0-{name}.gguf")

        commands = {**COMMANDS, **(BASE_COMMANDS if header else {})}
        CASES.append(HostileCase(f"gguf-dit-{name}", build, expect, commands))
        return make

    return register


@case("six-dims", ["guidance", "6 dimensions"])
def _six_dims(path: Path) -> Path:
    t = tensors()
    t["guidance_in.extra"] = np.zeros((1, 1, 1, 1, 2, 2), np.float32)
    return write(path, t, {"guidance_in.extra": "F32"})


@case("orig-shape-wrong-size", [f"comfy.gguf.orig_shape.{QKV}", "holds"])
def _orig_size(path: Path) -> Path:
    return write(path, tensors(), extra=lambda w: w.add_array(f"comfy.gguf.orig_shape.{QKV}", [48, 15]))


@case("orig-shape-strings", [f"comfy.gguf.orig_shape.{QKV}", "INT32"])
def _orig_strings(path: Path) -> Path:
    return write(path, tensors(), extra=lambda w: w.add_array(f"comfy.gguf.orig_shape.{QKV}", ["48", "16"]))


@case("orig-shape-negative", [f"comfy.gguf.orig_shape.{QKV}", "(-48, -16)"])
def _orig_negative(path: Path) -> Path:
    return write(path, tensors(), extra=lambda w: w.add_array(f"comfy.gguf.orig_shape.{QKV}", [-48, -16]))


@case("truncated", ["runs past the end"])
def _truncated(path: Path) -> Path:
    write(path, tensors())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 600])
    return path


@case("tensor-count-huge", ["tensor infos"])
def _count(path: Path) -> Path:
    write(path, tensors())
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 8, 1 << 40)
    path.write_bytes(bytes(data))
    return path


@case("shape-other-width", [QKV.removesuffix(".weight"), "expects a weight of shape"], header=False)
def _width(path: Path) -> Path:
    t = tensors()
    t[QKV] = np.zeros((48, 32), np.float32)
    return write(path, t)


@case("q8-scale-nan", [MLP2, "NaN"], header=False)
def _scale_nan(path: Path) -> Path:
    import gguf

    t = tensors()
    write(path, t)
    r = next(x for x in gguf.GGUFReader(path).tensors if x.name == MLP2)
    assert r.tensor_type == gguf.GGMLQuantizationType.Q8_0
    data = bytearray(path.read_bytes())
    data[r.data_offset : r.data_offset + 2] = np.array([np.nan], np.float16).tobytes()
    path.write_bytes(bytes(data))
    return path


__all__ = ["CASES", "tensors", "write"]
