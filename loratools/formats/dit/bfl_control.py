"""BFL's Flux control LoRAs (``flux1-canny-dev-lora``, ``flux1-depth-dev-lora``): BFL-named ``lora_A``/``lora_B``
modules plus every block's q/k RMSNorm scale as a full tensor, and an ``img_in`` LoRA whose input is twice the
base's (the latent and the control image's latent, concatenated by channel).

Names follow diffusers' ``loaders/lora_conversion_utils.py`` ``_convert_bfl_flux_control_lora_to_diffusers``: the
LoRA modules are Flux's (:mod:`.flux`, qkv and linear1 split exactly), ``…img_attn.norm.query_norm.scale`` is
``transformer_blocks.N.attn.norm_q.weight`` (``key_norm``: ``norm_k``; ``txt_attn``: ``norm_added_q/k``; a single
block's ``norm.query_norm``: ``attn.norm_q``). The norm scales are read as replacements (diffusers'
``FluxLoraLoaderMixin._load_norm_into_transformer`` overwrites them the same way).

The wider ``img_in``: diffusers' ``FluxControlPipeline.load_lora_weights`` widens a plain FLUX.1-dev
``x_embedder`` (``_maybe_expand_transformer_param_shape_or_error_``: zero columns, ``in_channels`` doubled in
the config). loratools does not rewrite a base's shapes or config: it merges such a file into a base whose
``img_in``/``x_embedder`` already takes the wider input and refuses any other with one line saying so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import FormatError, ShapeError

if TYPE_CHECKING:
    import torch

    from loratools.formats.registry import KeyResolver
    from loratools.model.adapter import LoraModule

_NORM = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.((?:img_attn\.|txt_attn\.)?norm)\.(query|key)_norm\.scale$")
_DIFF_NORM = {("img_attn.norm", "query"): "attn.norm_q", ("img_attn.norm", "key"): "attn.norm_k",
              ("txt_attn.norm", "query"): "attn.norm_added_q", ("txt_attn.norm", "key"): "attn.norm_added_k",
              ("norm", "query"): "attn.norm_q", ("norm", "key"): "attn.norm_k"}  # fmt: skip


def is_norm(key: str) -> bool:
    """Whether ``key`` is one of a control LoRA's norm scales (``…query_norm.scale``, ``…key_norm.scale``)."""
    return key.endswith(("query_norm.scale", "key_norm.scale"))


def norm_replacements(path: Path, tensors: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    """The norm scales keyed by the base tensor they replace: ``prefix`` + the BFL name for an original-layout
    single file (``prefix`` not None), else the diffusers ``transformer.`` name."""
    from loratools.model.finite import require_finite

    out = {}
    for key, t in tensors.items():
        m = _NORM.match(key)
        where = (m.group(3), m.group(4)) if m else None
        if m is None or where not in _DIFF_NORM or (m.group(1) == "single_blocks") != (m.group(3) == "norm"):
            raise FormatError(f"{path}: tensor {key!r} is no Flux q/k norm scale (double_blocks.N.img_attn.norm."
                              "query_norm.scale, single_blocks.N.norm.key_norm.scale …)", path=path)  # fmt: skip
        if not t.is_floating_point() or t.ndim != 1:
            raise FormatError(f"{path}: norm scale {key} is {t.dtype} {tuple(t.shape)}; expected a 1-D float tensor",
                              path=path)  # fmt: skip
        if not t.is_meta:
            require_finite(t, key, path)
        block = "transformer_blocks" if m.group(1) == "double_blocks" else "single_transformer_blocks"
        out[prefix + key if prefix is not None else f"transformer.{block}.{m.group(2)}.{_DIFF_NORM[where]}.weight"] = t
    return out


def check_in_width(path: Path, modules: dict[str, LoraModule], base: KeyResolver | None) -> None:
    """Refuses a base whose ``img_in``/``x_embedder`` takes fewer inputs than the file's ``img_in`` LoRA."""
    if base is None:
        return
    name = next((k for k in modules if k.endswith(("img_in", "transformer.x_embedder"))), None)
    if name is None:
        return
    key = name + ".weight" if name + ".weight" in base.keys() else base.tensor_key(name)
    if key is None:
        return
    have, want = int(base.info(key).shape[1]), modules[name].in_features
    if have != want:
        raise ShapeError(
            f"{path}: img_in lora_A takes {want} inputs and the base's {key} takes {have}: a BFL control LoRA "
            f"(Canny/Depth) feeds img_in the latent and the control image's latent side by side",
            hint=f"merge it into a base whose img_in/x_embedder already takes {want} inputs (a FLUX.1 Canny/Depth dev "
            "checkpoint), or load it with diffusers' FluxControlPipeline, which widens x_embedder with zero columns",
            path=path,
        )


__all__ = ["check_in_width", "is_norm", "norm_replacements"]
