"""``rescale``: change an adapter's strength (``scale``) or normalize its alpha (``alpha``).

``scale=S`` multiplies every ΔW by S exactly: alpha becomes |S|·alpha (the factors are untouched, so
this is bit-exact in any dtype) and a negative S flips the sign of B (also exact). ``alpha=A`` sets
every module's alpha to A and multiplies B (and the LoRA bias, which PEFT scales too) by s_old/s_new so
ΔW is unchanged up to one rounding in the factors' dtype (DoRA magnitudes are kept: W+ΔW, and so the
merged weight, is unchanged).

``scale`` is a statement about the merged effect: W_S = W + S·(W′ − W). For DoRA (W′ = m·(W+ΔW)/‖W+ΔW‖
per output row) and ``modules_to_save`` (W′ = the saved tensor) that is not a matter of ΔW, and in
general no DoRA module has W + S·(W′ − W) as its merge (scaling a DoRA ΔW by 0.5 instead was measured
37% off the halved effect on a user's adapter, 95–98% on fixtures/peft/llama-dora). Such modules need
the base: with ``base`` they become exact plain LoRA of W′ − W (:func:`loratools.ops.lower.lower_to_lora`,
full rank if needed), then scaled; without it they are refused with that way out.
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
    lowered: list[str] = []
    if scale is not None and scale != 1.0:
        ad, lowered = _lower_base_dependent(ad, base, scale)
    modules = {name: rescale_module(m, scale=scale, alpha=alpha) for name, m in ad.modules.items()}
    out = replace(ad, modules=modules, meta={**ad.meta, "lowered": lowered})
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


def _lower_base_dependent(ad: Adapter, base: str | Path | None, scale: float) -> tuple[Adapter, list[str]]:
    """``ad`` with its DoRA modules and full replacements as exact plain LoRA against ``base`` (so that
    ``scale`` scales their merged effect), and their names; refused without a Hugging Face base."""
    from loratools.errors import UnsupportedError, name_list

    dora = [n for n, m in ad.modules.items() if m.magnitude is not None]
    full = sorted(ad.replacements)
    if not dora and not full:
        return ad, []
    what = f"DoRA module {dora[0]}" if dora else f"full tensor {full[0]} (modules_to_save)"
    count = len(dora) + len(full)
    more = f" (and {count - 1} more: {name_list((dora + full)[1:], 3)})" if count > 1 else ""
    why = (
        f"rescale --scale {scale:g}: {what}{more}: its merged weight is not W + ΔW (DoRA renormalizes W + ΔW "
        "per row; a saved tensor replaces W), so scaling ΔW would not scale its effect, and no such module "
        f"merges to W + {scale:g}·(W′ − W)"
    )
    way_out = (
        "pass --base BASE (the Hugging Face model folder): these modules become exact plain LoRA of W′ − W, "
        "then scaled; or lower them first: loratools convert ADAPTER --to peft --as-lora --base BASE -o low/"
    )
    from loratools.formats.adapter_io import is_llamacpp_gguf

    if base is None or is_llamacpp_gguf(base):
        raise UnsupportedError(why, hint=way_out)
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.ops.lower import lower_to_lora

    reader = open_checkpoint(base)
    try:
        low, report = lower_to_lora(ad, reader)
    finally:
        reader.close()
    if report.kept_replacements:
        raise UnsupportedError(
            f"rescale --scale {scale:g}: full tensor {report.kept_replacements[0]} (modules_to_save) has no "
            f"2-D counterpart of its shape in {base}, so it cannot become a LoRA whose effect scales",
            hint="merge the adapter at full strength instead (loratools merge BASE ADAPTER -o merged)",
        )
    config = ad.meta.get("config")
    return replace(low, meta={**low.meta, "config": config}), [*dora, *(k.rpartition(".")[0] for k in full)]
