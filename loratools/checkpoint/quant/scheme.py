"""One quantization scheme in one module: the interface, and the registry of those modules.

A scheme module (``checkpoint/quant/<name>.py``) defines ``SCHEME``, an instance of a :class:`QuantScheme`
subclass, and is named in :data:`MODULES`: that file and that line are all a new scheme needs. The
older schemes (bitsandbytes, FP8, GPTQ, AWQ) are still branches in :mod:`.layout`.

Every path that dequantizes goes through :func:`.layout.dequantize`, which runs the value checks of
:mod:`.checks` before (``value_range``: the largest scale times the largest code must fit the dtype) and
the one finite check after, so a scheme here only unpacks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# the layout's QuantizedCheckpoint / QuantTensor, not imported: the layout imports this module
QuantizedCheckpoint = QuantTensor = Any

#: the scheme modules under ``loratools.checkpoint.quant`` (each defines ``SCHEME``), tried in this order
MODULES = ("mxfp4", "compressed", "mlx", "comfy_fp8")


class QuantScheme:
    """What :class:`~.layout.QuantizedCheckpoint` asks a scheme. ``names``: the scheme names it gives its
    tensors (``QuantTensor.scheme``); ``requantizable``: those ``--requantize`` can write."""

    names: tuple[str, ...] = ()
    requantizable: tuple[str, ...] = ()

    def implied_config(self, keys: set[str], info: Callable[[str], Any]) -> dict[str, Any] | None:
        """The ``quantization_config`` a checkpoint without config.json implies by its tensor names
        (``info(key)``: a tensor's header), or None (the default: the scheme needs a config)."""
        return None

    def detect(self, qcfg: dict[str, Any], config: dict[str, Any]) -> str | None:
        """The scheme name of a checkpoint with this ``quantization_config`` (and config.json), or None."""
        raise NotImplementedError

    def discover(self, cp: QuantizedCheckpoint, keys: set[str]) -> None:
        """Fill ``cp.tensors`` with the quantized modules among ``keys`` (header checks included)."""
        raise NotImplementedError

    def dequantize(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype, at: Callable[[str], str]
    ) -> torch.Tensor:
        raise NotImplementedError

    def value_range(
        self, t: QuantTensor, parts: dict[str, torch.Tensor], at: Callable[[str], str]
    ) -> tuple[str, float, float]:
        """``(role, largest |scale|, largest |code|)`` for the overflow check (``at(role)`` names a part)."""
        raise NotImplementedError

    def requantize(
        self, t: QuantTensor, merged: torch.Tensor, old: dict[str, torch.Tensor], where: str
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def bits(self, t: QuantTensor) -> int | None:
        return t.settings.get("bits")


@cache
def registered() -> tuple[QuantScheme, ...]:
    return tuple(importlib.import_module(f"loratools.checkpoint.quant.{m}").SCHEME for m in MODULES)


def by_name(scheme: str) -> QuantScheme | None:
    """The registered scheme that gives tensors the name ``scheme`` (None for the built-in ones)."""
    return next((s for s in registered() if scheme in s.names), None)


def implied_config(keys: set[str], info: Callable[[str], Any]) -> dict[str, Any] | None:
    """The first registered scheme's config implied by the tensor names of a checkpoint without config.json."""
    for s in registered():
        qcfg = s.implied_config(keys, info)
        if qcfg is not None:
            return qcfg
    return None


def detect(qcfg: dict[str, Any], config: dict[str, Any]) -> str | None:
    for s in registered():
        name = s.detect(qcfg, config)
        if name is not None:
            return name
    return None


__all__ = ["MODULES", "QuantScheme", "by_name", "detect", "implied_config", "registered"]
