"""What both GGUF merges (llama.cpp models, :mod:`.gguf`; ComfyUI-GGUF diffusion files, :mod:`.gguf_diffusion`)
need of the ``gguf`` package's writer: a ``GGUFWriter`` that packs numeric arrays in one piece, the base's
metadata copied into it, and the ``add_tensor_info`` arguments of a tensor written in a given type."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def writer_class() -> Any:
    import gguf
    import numpy as np

    class Writer(gguf.GGUFWriter):
        """``GGUFWriter`` that packs a numpy array of fixed-size values in one piece (its own ``_pack_val``
        packs one element at a time: 7.6 s for a base's 4 MiB uint8 array)."""

        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and isinstance(val, np.ndarray) and sub_type is not None:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", len(val)) + val.tobytes()
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def copy_metadata(fields: Any, writer: Any, record: dict[str, Any], path: Any) -> None:
    """Every key/value of a base's ``fields`` but the architecture (the writer's own), the header counts and an
    earlier merge's provenance, then this merge's ``record``; strings copied as their bytes, numeric arrays in one
    piece. An empty or nested array (which the gguf package cannot write) is refused naming ``path``."""
    import json

    import gguf

    from loratools.errors import UnsupportedError

    for f in fields.values():
        if f.name in (gguf.Keys.General.ARCHITECTURE, "loratools.provenance") or f.name.startswith("GGUF."):
            continue
        sub = gguf.GGUFValueType(f.types[1]) if f.is_array else None
        if f.is_array and (f.count == 0 or sub == gguf.GGUFValueType.ARRAY):
            raise UnsupportedError(
                f"{path}: metadata {f.name} is an empty or nested array, which the gguf package cannot write back",
                path=path,
            )
        writer.add_key_value(f.name, f.values(), gguf.GGUFValueType(f.types[0]), sub_type=sub)
    writer.add_string("loratools.provenance", json.dumps(record, sort_keys=True))


def tensor_info(shape: tuple[int, ...], out_type: str) -> tuple[Any, Any, int, Any]:
    """(shape, numpy dtype, nbytes, raw type) for ``GGUFWriter.add_tensor_info`` (quantized: byte shape)."""
    import math

    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[out_type]
    if out_type in ("F32", "F16"):
        dtype = np.dtype(np.float32 if out_type == "F32" else np.float16)
        return shape, dtype, math.prod(shape) * dtype.itemsize, qtype
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), math.prod(byte_shape), qtype


__all__ = ["tensor_info", "writer_class"]
