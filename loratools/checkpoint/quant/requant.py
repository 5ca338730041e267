"""Quantize a merged weight back into its module's own scheme and settings (bitsandbytes 4/8-bit, FP8).

The new parts have the roles (and, but for the 4-bit state JSON, the sizes) of the old ones, so a
requantized checkpoint keeps the base's tensor names, dtypes and block sizes. The arithmetic is
bitsandbytes' own (``Params4bit``/``Int8Params`` quantize on the CPU) and transformers' FP8 quantizer,
see :mod:`.bnb` and :mod:`.fp8`. GPTQ and AWQ need calibration data to quantize well: refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratools.errors import UnsupportedError

if TYPE_CHECKING:
    import torch

    from loratools.checkpoint.quant.layout import QuantTensor

REQUANTIZABLE = ("bnb-4bit", "bnb-8bit", "fp8")


def refuse_unless_requantizable(scheme: str, where: str) -> None:
    from loratools.checkpoint.quant.scheme import by_name

    plugin = by_name(scheme)
    if scheme in REQUANTIZABLE or (plugin is not None and scheme in plugin.requantizable):
        return
    raise UnsupportedError(
        f"{where}: --requantize cannot write {scheme} weights: {scheme.upper()} quantization needs calibration "
        "data and its own quantizer",
        hint="merge without --requantize (a 16-bit checkpoint), then quantize that with your GPTQ/AWQ tool",
    )


def requantize(
    t: QuantTensor, merged: torch.Tensor, old: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """New raw parts (role -> tensor) for module ``t`` holding ``merged`` (fp32, the logical shape)."""
    import torch

    from loratools.checkpoint.quant import bnb, fp8
    from loratools.checkpoint.quant.scheme import by_name

    refuse_unless_requantizable(t.scheme, where)
    plugin = by_name(t.scheme)
    if plugin is not None:
        return plugin.requantize(t, merged, old, where)
    if t.scheme == "bnb-4bit":
        state = bnb.parse_state(old["state"], where)
        packed, absmax = bnb.quantize_4bit(merged, old["quant_map"], state.blocksize)
        if packed.numel() != old["weight"].numel():
            raise UnsupportedError(f"{where}: the requantized 4-bit data does not fit the stored layout")
        new = dict(old)
        new["weight"] = packed.reshape(old["weight"].shape).view(old["weight"].dtype)
        if state.nested:
            q, nabs, offset = bnb.quantize_nested(absmax, old["nested_quant_map"], state.nested_blocksize or 256)
            new.update(absmax=q, nested_absmax=nabs.to(old["nested_absmax"].dtype))
            packed_state = bnb.pack_state(state, offset)
            short = old["state"].numel() - packed_state.numel()
            if short > 0:  # JSON allows trailing spaces: keep the old length, so no later tensor moves
                packed_state = torch.cat([packed_state, torch.full((short,), ord(" "), dtype=torch.uint8)])
            new["state"] = packed_state
        else:
            new["absmax"] = absmax.to(old["absmax"].dtype)
        return new
    if t.scheme == "bnb-8bit":
        # Int8Params quantizes an fp16 copy (bitsandbytes nn.modules.Int8Params._quantize)
        q, scb = bnb.quantize_int8(merged.to(torch.float16))
        return {**old, "weight": q, "SCB": scb.to(old["SCB"].dtype)}
    if old["weight"].dtype != torch.float8_e4m3fn:
        raise UnsupportedError(
            f"{where}: --requantize writes float8_e4m3fn only, this base stores {old['weight'].dtype}"
        )
    block = t.settings.get("block")
    q, inv = fp8.quantize(merged, block, old["scale"].dtype, ue8m0=bool(t.settings.get("ue8m0")))
    if t.settings.get("scale_name") == "weight_scale":  # compressed-tensors names the scale itself, same value
        pass
    return {**old, "weight": q, "scale": inv.reshape(old["scale"].shape)}
