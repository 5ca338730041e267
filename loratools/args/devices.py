"""``--device``: one check, one message, for every command that computes with PyTorch."""

from __future__ import annotations

from typing import Any

from loratools.errors import UnsupportedError, UsageError

#: the refusal every command gives for --device cuda on a machine without a usable GPU
NO_CUDA = "--device cuda: PyTorch sees no CUDA GPU on this machine"
NO_CUDA_HINT = "use --device cpu (the default), or run on a machine with a GPU"


def torch_device(device: str | None) -> Any:
    """``None`` for the CPU, ``torch.device("cuda")`` when PyTorch has a GPU; UnsupportedError otherwise."""
    if device in (None, "cpu"):
        return None
    if device != "cuda":
        raise UsageError(f"--device {device!r} is not cpu or cuda")
    import torch

    if not torch.cuda.is_available():
        raise UnsupportedError(NO_CUDA, hint=NO_CUDA_HINT)
    return torch.device("cuda")
