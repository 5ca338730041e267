"""A checked, lazy GGUF reader: the header is parsed with every count and length bounded by the file's size.

The ``gguf`` package's ``GGUFReader`` builds one numpy part per array element before anything can be
checked (a metadata array claiming 2⁴⁰ elements never returns; a real 4 MiB uint8 array takes minutes).
Here an element count is multiplied by the smallest size an element can have and compared with the bytes
left before any loop runs; numeric arrays are skipped over, not read; string values are decoded only when
asked for. Tensor infos are checked the way llama.cpp's ``gguf_init_from_file_impl`` checks them (1 to 4
dimensions, a known type, rows of whole blocks, data offsets aligned), each tensor's bytes lie inside the
file and no two tensors share bytes. Tensor data is a view of a read-only memory map, read only on demand.

Layout (``gguf-py/gguf/constants.py``, llama.cpp ``ggml/src/gguf.cpp``): magic ``GGUF``, uint32 version
(2 or 3), uint64 tensor count, uint64 key/value count, the key/values (string key, uint32 type, value),
the tensor infos (string name, uint32 n_dims, uint64 ne[n_dims], uint32 type, uint64 offset), padding to
``general.alignment`` (default 32), then the data section.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, InputNotFoundError, UnsupportedError

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 3  # arrays of arrays; llama.cpp itself reads no nested arrays
HINT = "the file is truncated or damaged: re-download it, or write it again with its converter"

#: GGUF value type code -> (name, struct format or "" for string / array, size in bytes)
VALUE_TYPES: dict[int, tuple[str, str, int]] = {
    0: ("UINT8", "B", 1),
    1: ("INT8", "b", 1),
    2: ("UINT16", "H", 2),
    3: ("INT16", "h", 2),
    4: ("UINT32", "I", 4),
    5: ("INT32", "i", 4),
    6: ("FLOAT32", "f", 4),
    7: ("BOOL", "?", 1),
    8: ("STRING", "", 8),  # uint64 length + bytes: 8 bytes at least
    9: ("ARRAY", "", 12),  # uint32 item type + uint64 count: 12 bytes at least
    10: ("UINT64", "Q", 8),
    11: ("INT64", "q", 8),
    12: ("FLOAT64", "d", 8),
}
STRING, ARRAY = 8, 9
INTEGER_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
FLOAT_TYPES = frozenset({6, 12})
#: tensor types stored element by element (the rest are blocks of bytes)
_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


def type_name(code: int) -> str:
    return VALUE_TYPES[code][0] if code in VALUE_TYPES else f"type {code}"


@dataclass(frozen=True)
class GgufField:
    """One metadata key/value; ``types`` is ``[type]`` or ``[ARRAY, item type, ...]`` (GGUFValueType codes)."""

    name: str
    types: tuple[int, ...]
    offset: int  # where the value starts (after the type code; for an array, at its item type)
    count: int  # elements of an array, 1 for a scalar
    file: GgufFile

    @property
    def is_array(self) -> bool:
        return self.types[0] == ARRAY

    def contents(self, raw: bool = False) -> Any:
        """The value as Python data (an array as a list); strings as ``bytes`` with ``raw``, else decoded
        (a FormatError naming the key when they are not UTF-8)."""
        if not self.is_array:
            return self.file._value(self.types[0], self.offset, self.name, raw)[0]
        return self.file._array(self.offset, self.name, raw)[0]

    def values(self) -> Any:
        """An array of fixed-size values as a read-only numpy view of the file (no object per element);
        ``contents()`` for any other field."""
        fmt = VALUE_TYPES[self.types[1]][1] if self.is_array and len(self.types) == 2 else ""
        if not fmt:
            return self.contents(raw=True)
        import numpy as np

        return np.frombuffer(self.file._mm, dtype="<" + fmt, count=self.count, offset=self.offset + 12)


@dataclass(frozen=True)
class GgufTensor:
    """One tensor info: ``dims`` in GGUF order (ne[0] first), ``shape`` in PyTorch order (reversed)."""

    name: str
    dims: tuple[int, ...]
    type_code: int
    offset: int  # relative to the data section, as stored
    data_offset: int  # absolute offset in the file
    n_elements: int
    n_bytes: int
    file: GgufFile

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def tensor_type(self) -> Any:
        import gguf

        return gguf.GGMLQuantizationType(self.type_code)

    @property
    def type_label(self) -> str:
        return self.tensor_type.name

    @property
    def data(self) -> np.ndarray:
        """The stored values (plain types, PyTorch shape) or bytes (block types, byte shape), as
        ``GGUFReader`` shapes them: a read-only view of the file's memory map, read on access."""
        import numpy as np

        mm = self.file._mm
        plain = _PLAIN.get(self.type_label)
        if plain is not None:
            arr = np.frombuffer(mm, dtype=plain, count=self.n_elements, offset=self.data_offset)
            return arr.reshape(self.shape)
        from gguf.quants import quant_shape_to_byte_shape

        arr = np.frombuffer(mm, dtype=np.uint8, count=self.n_bytes, offset=self.data_offset)
        return arr.reshape(quant_shape_to_byte_shape(self.shape, self.tensor_type))


class GgufFile:
    """A GGUF file whose header has been read and checked (see the module docstring)."""

    def __init__(self, path: str | Path, max_dims: int = MAX_DIMS) -> None:
        self.path = Path(path)
        self.max_dims = max_dims  # ComfyUI-GGUF's diffusion files hold 5-D conv weights (fix_5d_tensors.py)
        try:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - held for the memory map's lifetime
        except FileNotFoundError:
            raise InputNotFoundError(f"{self.path}: no such file", path=self.path) from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a folder, expected a .gguf file", path=self.path) from None
        self.size = os.fstat(self._fh.fileno()).st_size
        if self.size < 24:
            self._fh.close()
            raise self._bad(f"{self.size} bytes is too short for a GGUF header")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.fields: dict[str, GgufField] = {}
        self.tensors: list[GgufTensor] = []
        self.alignment = DEFAULT_ALIGNMENT
        self._parse()

    # -- errors and bounded reads ---------------------------------------------------------------------
    def _bad(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what}", hint=HINT, path=self.path)

    def _need(self, off: int, n: int, what: str) -> None:
        if n > self.size - off:
            left = max(self.size - off, 0)
            raise self._bad(f"{what} needs {n} bytes at offset {off}, the file has {left} left")

    def _unpack(self, fmt: str, off: int, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self._need(off, size, what)
        return struct.unpack_from("<" + fmt, self._mm, off)[0]

    def _string(self, off: int, what: str) -> tuple[bytes, int]:
        n = self._unpack("Q", off, what)
        self._need(off + 8, n, f"{what} (a string of {n} bytes)")
        return bytes(self._mm[off + 8 : off + 8 + n]), off + 8 + n

    def _text(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._bad(f"{what} is not valid UTF-8 ({raw[:40]!r})") from None

    # -- values -----------------------------------------------------------------------------------------
    def _value(self, code: int, off: int, key: str, raw: bool) -> tuple[Any, int]:
        """(value, end offset) of one non-array value of type ``code`` at ``off``."""
        if code == STRING:
            data, end = self._string(off, f"metadata {key}")
            return (data if raw else self._text(data, f"metadata {key}")), end
        fmt = VALUE_TYPES[code][1]
        return self._unpack(fmt, off, f"metadata {key}"), off + VALUE_TYPES[code][2]

    def _array(self, off: int, key: str, raw: bool = False, skip: bool = False, depth: int = 1) -> tuple[Any, int]:
        """(list or None when ``skip``, end offset) of the array whose item type is at ``off``."""
        code = self._unpack("I", off, f"metadata {key} (array item type)")
        count = self._unpack("Q", off + 4, f"metadata {key} (array length)")
        if code not in VALUE_TYPES:
            raise self._bad(f"metadata {key} is an array of unknown value type {code}")
        if code == ARRAY and depth >= MAX_NESTING:
            raise self._bad(f"metadata {key} nests arrays more than {MAX_NESTING} deep")
        start, least = off + 12, VALUE_TYPES[code][2]
        self._need(start, count * least, f"metadata {key} (an array of {count} {type_name(code)})")
        fmt = VALUE_TYPES[code][1]
        if fmt:  # fixed size: nothing to walk
            end = start + count * least
            if skip:
                return None, end
            import numpy as np

            return np.frombuffer(self._mm, dtype="<" + fmt, count=count, offset=start).tolist(), end
        items: list[Any] | None = None if skip else []
        pos = start
        for _ in range(count):
            if code == STRING:
                n = self._unpack("Q", pos, f"metadata {key} (a string in the array)")
                self._need(pos + 8, n, f"metadata {key} (a string of {n} bytes in the array)")
                if items is not None:
                    data = bytes(self._mm[pos + 8 : pos + 8 + n])
                    items.append(data if raw else self._text(data, f"metadata {key}"))
                pos += 8 + n
            else:
                value, pos = self._array(pos, key, raw, skip, depth + 1)
                if items is not None:
                    items.append(value)
        return items, pos

    def _array_types(self, off: int) -> tuple[int, ...]:
        codes = [ARRAY]
        while True:
            code = struct.unpack_from("<I", self._mm, off)[0]
            codes.append(code)
            if code != ARRAY or not struct.unpack_from("<Q", self._mm, off + 4)[0]:
                return tuple(codes)
            off += 12

    # -- the header ---------------------------------------------------------------------------------------
    def _parse(self) -> None:
        if bytes(self._mm[:4]) != MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (no GGUF magic)", path=self.path)
        version = self._unpack("I", 4, "version")
        if version not in VERSIONS:
            if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
                raise UnsupportedError(
                    f"{self.path}: a big-endian GGUF file; only little-endian ones are read", path=self.path
                )
            raise self._bad(f"GGUF version {version} is not one loratools reads (2 or 3)")
        self.version = version
        n_tensors, n_kv = self._unpack("Q", 8, "tensor count"), self._unpack("Q", 16, "key/value count")
        # the smallest key/value is 13 bytes (key length, type, one byte), the smallest tensor info 24
        self._need(24, n_kv * 13, f"{n_kv} metadata key/values")
        self._need(24, n_tensors * 24, f"{n_tensors} tensor infos")
        off = 24
        for _ in range(n_kv):
            off = self._field(off)
        self._need(off, n_tensors * 24, f"{n_tensors} tensor infos")
        infos = []
        for _ in range(n_tensors):
            info, off = self._tensor_info(off)
            infos.append(info)
        self.alignment = self._alignment()
        self.data_start = -(-off // self.alignment) * self.alignment
        if any(self._mm[off : min(self.data_start, self.size)]):  # writers pad with zeros: infos remain
            raise self._bad(f"the {n_tensors} tensor infos end at byte {off}, but non-zero bytes follow (count?)")
        self._tensors(infos)

    def _field(self, off: int) -> int:
        raw_key, off = self._string(off, "a metadata key")
        key = self._text(raw_key, f"metadata key at offset {off - len(raw_key) - 8}")
        if key in self.fields:
            raise self._bad(f"metadata {key} appears twice")
        code = self._unpack("I", off, f"metadata {key} (type)")
        if code not in VALUE_TYPES:
            raise self._bad(f"metadata {key} has unknown value type {code}")
        if code == ARRAY:
            _, end = self._array(off + 4, key, skip=True)
            types, count = self._array_types(off + 4), struct.unpack_from("<Q", self._mm, off + 8)[0]
        else:
            _, end = self._value(code, off + 4, key, raw=True)
            types, count = (code,), 1
        self.fields[key] = GgufField(key, types, off + 4, count, self)
        return end

    def _tensor_info(self, off: int) -> tuple[tuple[str, tuple[int, ...], int, int], int]:
        raw, off = self._string(off, "a tensor name")
        name = self._text(raw, f"tensor name at offset {off - len(raw) - 8}")
        n_dims = self._unpack("I", off, f"tensor {name} (dimension count)")
        if not 1 <= n_dims <= self.max_dims:
            raise self._bad(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to {self.max_dims})")
        self._need(off + 4, 8 * n_dims + 12, f"tensor {name} (its info)")
        dims = struct.unpack_from(f"<{n_dims}Q", self._mm, off + 4)
        off += 4 + 8 * n_dims
        code, rel = struct.unpack_from("<IQ", self._mm, off)
        return (name, tuple(int(d) for d in dims), int(code), int(rel)), off + 12

    def _alignment(self) -> int:
        f = self.fields.get("general.alignment")
        if f is None:
            return DEFAULT_ALIGNMENT
        value = f.contents() if f.types == (4,) else None
        if not isinstance(value, int) or value <= 0 or value & (value - 1):
            shown = type_name(f.types[0]) if value is None else value
            raise self._bad(f"metadata general.alignment must be a uint32 power of two, not {shown}")
        return value

    def _tensors(self, infos: list[tuple[str, tuple[int, ...], int, int]]) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
        seen: set[str] = set()
        for name, dims, code, rel in infos:
            if name in seen:
                raise self._bad(f"tensor {name} appears twice")
            seen.add(name)
            if code not in sizes:
                raise self._bad(f"tensor {name} has unknown tensor type {code}")
            block, type_size = sizes[code]
            if dims[0] % block:
                qname = GGMLQuantizationType(code).name
                raise self._bad(
                    f"tensor {name}: {dims[0]} values per row is not a whole number of {qname} blocks of {block}"
                )
            n = math.prod(dims)
            n_bytes = n // block * type_size
            if rel % self.alignment:
                raise self._bad(f"tensor {name}: data offset {rel} is not a multiple of the alignment {self.alignment}")
            start = self.data_start + rel
            if n_bytes > self.size - start:
                raise self._bad(
                    f"tensor {name} ({'x'.join(map(str, reversed(dims)))}, {n_bytes} bytes at data offset {rel}) "
                    f"runs past the end of the file ({self.size} bytes)"
                )
            self.tensors.append(GgufTensor(name, dims, code, rel, start, n, n_bytes, self))
        spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in self.tensors if t.n_bytes)
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
            if start_b < end_a:
                raise self._bad(f"tensors {a} and {b} share bytes of the data section (overlapping data offsets)")

    # -- lookups ------------------------------------------------------------------------------------------
    def get_field(self, key: str) -> GgufField | None:
        return self.fields.get(key)

    def tensor(self, name: str) -> GgufTensor | None:
        return next((t for t in self.tensors if t.name == name), None)

    def scalar(self, key: str) -> Any:
        """A scalar's value, None when the key is absent; a FormatError when it is an array."""
        f = self.fields.get(key)
        if f is None:
            return None
        if f.is_array:
            raise self._bad(f"metadata {key} is an array of {f.count} values, expected one value")
        return f.contents()

    def string(self, key: str) -> str | None:
        f = self.fields.get(key)
        if f is not None and f.types != (STRING,):
            raise self._bad(f"metadata {key} is stored as {self.describe(key)}, expected a string")
        return self.scalar(key)

    def integer(self, key: str) -> int | None:
        f = self.fields.get(key)
        if f is not None and f.types[0] not in INTEGER_TYPES:
            raise self._bad(f"metadata {key} is stored as {self.describe(key)}, expected an integer")
        return self.scalar(key)

    def number(self, key: str) -> float | None:
        """An integer or float value as a float, checked finite."""
        f = self.fields.get(key)
        if f is not None and f.types[0] not in INTEGER_TYPES | FLOAT_TYPES:
            raise self._bad(f"metadata {key} is stored as {self.describe(key)}, expected a number")
        value = self.scalar(key)
        if value is not None and not math.isfinite(value):
            raise self._bad(f"metadata {key} is {value}, expected a finite number")
        return None if value is None else float(value)

    def describe(self, key: str) -> str:
        """``a STRING ('abc')`` / ``an array of 3 UINT32``: how a key is stored, for messages."""
        f = self.fields[key]
        if f.is_array:
            return f"an array of {f.count} {type_name(f.types[1])}"
        shown = repr(f.contents(raw=True))[:40]
        return f"{type_name(f.types[0])} ({shown})"


def open_gguf_file(path: str | Path, max_dims: int = MAX_DIMS) -> GgufFile:
    return GgufFile(path, max_dims)


def is_gguf_file(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == MAGIC
