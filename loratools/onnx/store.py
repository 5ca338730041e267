"""ONNX initializers on disk: read each one wherever it lives, write a model with ONE external data file.

An ONNX model keeps small tensors inline and large ones in external files named by each tensor's
``location`` (with ``offset``/``length``). :class:`InitializerSource` reads either kind without loading
the whole model; :func:`write_model` streams every initializer (patched or copied as bytes) into
``<name>.data`` beside ``<name>`` and saves the graph proto, which then holds no weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loratools.errors import FormatError, InputNotFoundError, UnsafeInputError, require

if TYPE_CHECKING:
    import onnx
    import torch

MODEL_FILE = "model.onnx"
#: tensors at least this large go to the external data file; smaller ones stay inline
EXTERNAL_THRESHOLD = 1024
#: byte alignment of tensors in the data file (large ones page-aligned so onnxruntime can mmap them)
ALIGN_SMALL, ALIGN_LARGE, LARGE = 64, 4096, 1 << 20
_CHUNK = 64 << 20


def onnx_module():  # noqa: ANN201 - returns the onnx module
    """``onnx``, or a MissingExtraError naming the ``onnx`` extra."""
    return require("onnx", "onnx")


def model_path(path: str | Path) -> Path:
    """``model.onnx`` inside a folder (or the ``.onnx`` file itself)."""
    p = Path(path)
    if p.is_dir():
        found = p / MODEL_FILE
        if not found.is_file():
            candidates = sorted(p.glob("*.onnx"))
            if len(candidates) != 1:
                raise InputNotFoundError(
                    f"{p}: no {MODEL_FILE} in this folder",
                    hint="pass a folder written by `loratools export-onnx` or the path of an .onnx file",
                    path=p,
                )
            found = candidates[0]
        return found
    if not p.is_file():
        raise InputNotFoundError(f"{p}: no such ONNX model", path=p)
    if p.suffix != ".onnx":
        raise FormatError(f"{p}: not an .onnx file", path=p)
    return p


def load_graph(path: Path) -> onnx.ModelProto:
    """The model proto without external data (weights stay on disk)."""
    onnx = onnx_module()
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise FormatError(f"{path}: not a readable ONNX model ({exc.__class__.__name__}: {exc})", path=path) from None


def external_info(tensor: onnx.TensorProto) -> dict[str, str] | None:
    """``{"location", "offset", "length"}`` of an external tensor, or None for an inline one."""
    onnx = onnx_module()
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    onnx = onnx_module()
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


class InitializerSource:
    """Bytes of initializers of a model in folder ``root``, memory-mapped from their external files."""

    def __init__(self, model_file: Path) -> None:
        self.model_file = model_file
        self.root = model_file.parent
        self._maps: dict[str, np.memmap] = {}

    def _map(self, location: str) -> np.memmap:
        if location not in self._maps:
            if os.path.isabs(location) or ".." in Path(location).parts:
                raise UnsafeInputError(f"{self.model_file}: external data location {location!r} leaves the folder")
            path = self.root / location
            if not path.is_file():
                raise InputNotFoundError(
                    f"{self.model_file}: external data file {location} is missing",
                    hint="copy the model together with its .data file(s)",
                    path=path,
                )
            self._maps[location] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[location]

    def raw(self, tensor: onnx.TensorProto) -> memoryview | bytes:
        """The tensor's little-endian bytes (a view into the data file where it is external)."""
        ext = external_info(tensor)
        if ext is None:
            if tensor.raw_data:
                return tensor.raw_data
            from onnx import numpy_helper

            return numpy_helper.to_array(tensor).tobytes()
        mm = self._map(ext["location"])
        offset = int(ext.get("offset", 0))
        length = int(ext["length"]) if "length" in ext else tensor_nbytes(tensor)
        if offset < 0 or offset + length > mm.shape[0]:
            raise FormatError(
                f"{self.model_file}: initializer {tensor.name} points past the end of {ext['location']}",
                path=self.model_file,
            )
        return memoryview(mm[offset : offset + length])

    def copy_into(self, tensor: onnx.TensorProto, out: Any) -> int:
        """Append an external tensor's bytes to the unbuffered file ``out`` (copy_file_range where possible)."""
        ext = external_info(tensor) or {}
        view = self.raw(tensor)  # validates location and range
        length = len(view)
        offset = int(ext.get("offset", 0))
        copy_range = getattr(os, "copy_file_range", None)
        if copy_range is not None:
            with open(self.root / ext["location"], "rb") as src:
                done = 0
                try:
                    while done < length:
                        n = copy_range(src.fileno(), out.fileno(), length - done, offset + done)
                        if n <= 0:
                            break
                        done += n
                except OSError:
                    pass  # a file system without copy_file_range: finish in user space
                if done == length:
                    return length
                view = view[done:]
        _write_all(out, view)
        return length

    def tensor(self, tensor: onnx.TensorProto, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The initializer as a torch tensor (a private copy) in its stored dtype and shape.

        ``buffer`` (uint8, at least as large) is reused for external tensors instead of a fresh
        allocation, whose first touch of every page would cost more than the read itself.
        """
        import torch

        dtype = torch_dtype_of(tensor)
        ext = external_info(tensor)
        shape = tuple(int(d) for d in tensor.dims)
        if ext is None:
            data = bytearray(self.raw(tensor))
            return torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)
        self.raw(tensor)  # validates the location and byte range
        length = tensor_nbytes(tensor)
        if buffer is not None and buffer.numel() >= length:
            buf = buffer[:length]
        else:
            buf = torch.empty(length, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with open(self.root / ext["location"], "rb", buffering=0) as f:
            f.seek(int(ext.get("offset", 0)))
            done = 0
            while done < length:  # one read straight into the tensor's memory
                n = f.readinto(view[done:])
                if not n:
                    raise FormatError(f"{self.model_file}: {ext['location']} ended inside {tensor.name}")
                done += n
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        self._maps.clear()


def torch_dtype_of(tensor: onnx.TensorProto) -> torch.dtype:
    import torch

    onnx = onnx_module()
    names = {
        onnx.TensorProto.FLOAT: torch.float32,
        onnx.TensorProto.FLOAT16: torch.float16,
        onnx.TensorProto.BFLOAT16: torch.bfloat16,
        onnx.TensorProto.DOUBLE: torch.float64,
        onnx.TensorProto.INT64: torch.int64,
        onnx.TensorProto.INT32: torch.int32,
        onnx.TensorProto.INT8: torch.int8,
        onnx.TensorProto.UINT8: torch.uint8,
        onnx.TensorProto.BOOL: torch.bool,
    }
    if tensor.data_type not in names:
        raise FormatError(f"initializer {tensor.name}: ONNX data type {tensor.data_type} is not supported here")
    return names[tensor.data_type]


def write_model(
    model: onnx.ModelProto,
    source: InitializerSource | None,
    out_file: Path,
    replace: Callable[[onnx.TensorProto], bytes | None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``model`` to ``out_file`` with every large initializer in ``<out_file>.data``.

    ``replace(tensor)`` may return new bytes for an initializer (same dtype and shape); otherwise its
    bytes are copied from ``source`` in chunks. Returns the size of the data file. The proto is changed
    in place (its tensors then point at the new data file).
    """
    onnx = onnx_module()
    data_name = out_file.name + ".data"
    written = 0
    with open(out_file.parent / data_name, "wb", buffering=0) as f:
        for tensor in model.graph.initializer:
            new = replace(tensor) if replace is not None else None
            ext = external_info(tensor)
            if new is None and ext is None and tensor_nbytes(tensor) < EXTERNAL_THRESHOLD:
                continue  # small inline tensor: stays as it is
            if new is None and ext is not None and source is not None:
                written = _align(f, written, tensor_nbytes(tensor))
                length = source.copy_into(tensor, f)  # kernel-side copy, no pass through Python
                _point(tensor, data_name, written, length)
                written += length
                if progress is not None:
                    progress(1)
                continue
            if new is None:
                if source is None:
                    raise FormatError(f"{out_file}: initializer {tensor.name} has no source to copy from")
                new = source.raw(tensor)
            if memoryview(new).nbytes != tensor_nbytes(tensor):
                raise FormatError(f"initializer {tensor.name}: {len(new)} bytes for shape {list(tensor.dims)}")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                tensor.ClearField(field)
            new = memoryview(new).cast("B")
            if len(new) < EXTERNAL_THRESHOLD:
                tensor.ClearField("external_data")
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = bytes(new)
                continue
            written = _align(f, written, len(new))
            _write_all(f, new)
            _point(tensor, data_name, written, len(new))
            written += len(new)
            if progress is not None:
                progress(1)
    onnx.save(model, str(out_file))
    return written


def _align(f: Any, written: int, nbytes: int) -> int:
    """Pad the data file so the next tensor starts aligned (page-aligned when large); the new offset."""
    align = ALIGN_LARGE if nbytes >= LARGE else ALIGN_SMALL
    pad = (-written) % align
    if pad:
        _write_all(f, memoryview(b"\0" * pad))
    return written + pad


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` an external tensor at ``location``/``offset``/``length``."""
    onnx = onnx_module()
    tensor.ClearField("raw_data")
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _write_all(f: Any, view: memoryview) -> None:
    """Write every byte to an unbuffered file (raw writes may be partial)."""
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    done = 0
    while done < len(view):
        done += f.write(view[done : done + _CHUNK])
