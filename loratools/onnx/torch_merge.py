"""Adapters merged into a loaded PyTorch model's parameters (for export verification and benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter


def merge_in_memory(model: torch.nn.Module, adapters: Sequence[Adapter], weights: Sequence[float]) -> list[str]:
    """Add each adapter's weighted delta to the model's parameters (fp32 math); returns the modules.

    The layout comes from the module type (Linear stores (out, in); GPT-2's Conv1D (in, out)).
    """
    import torch

    from loratools.checkpoint.keymap import KeyMatcher
    from loratools.errors import UnsupportedError, ValidationError

    names = dict(model.named_parameters())
    matcher = KeyMatcher(list(names))
    done = []
    for adapter, w in zip(adapters, weights, strict=True):
        if adapter.replacements:
            raise UnsupportedError(
                f"{adapter.meta.get('source')}: full replacement tensors cannot be merged here",
                hint="merge into the checkpoint with `loratools merge` first",
            )
        for name, module in adapter.modules.items():
            key = matcher.tensor_key(name, "weight")
            if key is None:
                raise ValidationError(f"{adapter.meta.get('source')}: module {name} is not in the model")
            if module.magnitude is not None or module.bias is not None:
                raise UnsupportedError(f"module {name}: DoRA/LoRA bias: merge with `loratools merge` first")
            param = names[key]
            owner = model.get_submodule(key.rsplit(".", 1)[0])
            with torch.no_grad():
                if module.kind == "linear":
                    up, down = module.factors()
                    delta = (up * (module.scale * w)) @ down
                    if type(owner).__name__ == "Conv1D":
                        delta = delta.T
                else:
                    delta = module.delta() * w
                param.copy_((param.float() + delta.to(param.device)).to(param.dtype))
            done.append(name)
    return done
