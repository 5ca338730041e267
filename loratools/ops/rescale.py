"""``rescale``: change an adapter's strength (``scale``) or normalize its alpha (``alpha``).

``scale=S`` multiplies every ΔW by S exactly: alpha becomes |S|·alpha (the factors are untouched, so
this is bit-exact in any dtype) and a negative S flips the sign of B (also exact). ``alpha=A`` sets
every module's alpha to A and multiplies B (and the LoRA bias, which PEFT scales too) by s_old/s_new so
ΔW is unchanged up to one rounding in the factors' dtype. DoRA magnitudes are kept: with ``scale`` the
merged direction W+S·ΔW changes, as it would for any change of strength.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.args.numeric_args import POSITIVE, SCALE, check_optional
from loratools.errors import UsageError

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter, LoraModule


def _times(t, factor: float):  # noqa: ANN001, ANN202
    if t is None or factor == 1.0:
        return t
    if factor == -1.0:
        return -t
    return (t.float() * factor).to(t.dtype)


def rescale_module(module: LoraModule, *, scale: float | None = None, alpha: float | None = None) -> LoraModule:
    """One module rescaled (see the module docstring)."""
    from loratools.model.adapter import scale_for

    if scale is not None:
        sign = -1.0 if scale < 0 else 1.0
        return replace(
            module, alpha=module.alpha * abs(scale), up=_times(module.up, sign), bias=_times(module.bias, sign)
        )
    assert alpha is not None
    new_scale = scale_for(alpha, module.rank, module.use_rslora)
    factor = module.scale / new_scale
    return replace(module, alpha=alpha, up=_times(module.up, factor), bias=_times(module.bias, factor))


def rescale(
    adapter: Adapter | str | Path,
    *,
    scale: float | None = None,
    alpha: float | None = None,
    output: str | Path | None = None,
    to: str | None = None,
    overwrite: bool = False,
    trust_tensors: bool = False,
    base: str | Path | None = None,
    kohya_prefix: str | None = None,
) -> Adapter:
    """Multiply every ΔW by ``scale``, or set every alpha to ``alpha`` keeping ΔW; write it if ``output``.

    Returns the rescaled adapter. ``scale`` must be non-zero (0 would mean "alpha = r" to kohya tools);
    ``alpha`` must be positive. ``base`` resolves kohya names (to leave kohya with ``to``);
    ``kohya_prefix`` names modules for a kohya output (``lora_te_``).
    """
    from loratools.ops._algebra_io import load, write

    if (scale is None) == (alpha is None):
        raise UsageError("give exactly one of --scale and --alpha", hint="e.g. loratools rescale a/ --scale 0.5 -o b/")
    if scale is not None and scale == 0:
        raise UsageError("--scale 0 would remove the adapter", hint="use a small non-zero scale, or drop the adapter")
    check_optional("--scale", scale, SCALE)
    check_optional("--alpha", alpha, POSITIVE)
    ad, path = load(adapter, base=base, trust_tensors=trust_tensors)
    from loratools.model.adapter import require_lora

    require_lora(ad, "rescale")
    modules = {name: rescale_module(m, scale=scale, alpha=alpha) for name, m in ad.modules.items()}
    out = replace(ad, modules=modules, meta=dict(ad.meta))
    if output is not None:
        write(
            out,
            output,
            operation="rescale",
            parameters={"scale": scale, "alpha": alpha},
            inputs={"adapter": path},
            to=to,
            overwrite=overwrite,
            kohya_prefix=kohya_prefix,
            base=base,
        )
    return out
