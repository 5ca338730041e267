"""Quantized base checkpoints read as they sit on disk, one dequantized tensor at a time (pure torch).

Supported (from ``quantization_config`` in config.json): bitsandbytes 4-bit (nf4/fp4, with or without
double quantization) and 8-bit, FP8 with block-wise or per-tensor scales, GPTQ (2/4/8-bit, act-order,
v1 and v2 zero points) and AWQ GEMM. :func:`attach` gives a reader its :class:`QuantizedCheckpoint`:
the reader then lists one logical ``<module>.weight`` per quantized module (companions hidden) and
``get`` returns it dequantized in the base's compute dtype.
"""

from __future__ import annotations

from typing import Any

from loratools.checkpoint.quant.layout import SCHEMES, LogicalInfo, QuantizedCheckpoint, QuantTensor, scheme_of


def attach(reader: Any) -> QuantizedCheckpoint | None:
    """The quantized modules of ``reader`` (a CheckpointReader, not imported: the reader imports this
    package); None for a float checkpoint, an unknown method, or no packed tensor."""
    cfg = reader.config or {}
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict) and isinstance(cfg.get("quantization"), dict):  # MLX: only "quantization"
        qcfg = cfg["quantization"]
    raw = dict(reader.weight_map)

    def raw_info(key: str):  # noqa: ANN202
        return reader._file(raw[key]).info(key)

    if reader.config is None:  # no config.json: the tensor names may say it (ComfyUI's scaled_fp8 marker)
        from loratools.checkpoint.quant.scheme import implied_config

        qcfg = implied_config(set(raw), raw_info)
    if not isinstance(qcfg, dict) or scheme_of(qcfg, cfg) is None:
        return None

    def raw_get(key: str):  # noqa: ANN202
        return _pread_tensor(reader._file(raw[key]), raw[key], key)

    found = QuantizedCheckpoint(qcfg, cfg, list(raw), raw_info, raw_get, str(reader.root), lambda k: str(raw[k]))
    # a config that claims quantization over float weights: nothing to dequantize (merge refuses it)
    return found if found.tensors else None


def _pread_tensor(f: Any, path: Any, key: str) -> Any:
    """A stored tensor read with ``pread`` into a private buffer: no page-cache map pages in our RSS."""
    import os

    import torch

    from loratools.files.safetensors_file import torch_dtype

    info = f.info(key)
    if not hasattr(info, "start") or info.nbytes == 0:
        return f.get(key)
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view, pos = memoryview(buf.numpy()), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while pos < info.nbytes:
            got = os.preadv(fd, [view[pos:]], info.start + pos)
            if got <= 0:
                raise OSError(f"{path}: unexpected end of file reading {key}")
            pos += got
    finally:
        os.close(fd)
    return buf.view(torch_dtype(info.dtype)).reshape(info.shape)


__all__ = ["SCHEMES", "LogicalInfo", "QuantTensor", "QuantizedCheckpoint", "attach", "scheme_of"]
