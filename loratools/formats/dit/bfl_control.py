"""BFL's Flux control LoRAs (``flux1-canny-dev-lora``, ``flux1-depth-dev-lora``): BFL-named ``lora_A``/``lora_B``
modules plus every block's q/k RMSNorm scale as a full tensor, and an ``img_in`` LoRA whose input is twice the
base's (the latent and the control image's latent, concatenated by channel).

Names follow diffusers' ``loaders/lora_conversion_utils.py`` ``_convert_bfl_flux_control_lora_to_diffusers``: the
LoRA modules are Flux's (:mod:`.flux`, qkv and linear1 split exactly), ``…img_attn.norm.query_norm.scale`` is
``transformer_blocks.N.attn.norm_q.weight`` (``key_norm``: ``norm_k``; ``txt_attn``: ``norm_added_q/k``; a single
block's ``norm.query_norm``: ``attn.norm_q``). The norm scales are read as replacements (diffusers'
``FluxLoraLoaderMixin._load_norm_into_transformer`` overwrites them the same way).

The wider ``img_in``: diffusers' ``FluxControlPipeline.load_lora_weights`` widens a plain FLUX.1-dev
``x_embedder`` (``_maybe_expand_transformer_param_shape_or_error_``: zero columns, ``in_channels`` raised in
the config). loratools merges such a file into a base whose ``img_in``/``x_embedder`` already takes the wider
input; into a plain one only with ``merge --expand-base`` (:func:`expanding_base` is on while that merge reads
its adapters; the widening itself is the plan's, ``ops/merge/widen.py``), and refuses it otherwise in one line
naming the flag.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar
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


#: the input layers a control LoRA may widen (diffusers ``x_embedder``, BFL/ComfyUI ``img_in``), by tensor-name end
INPUT_LAYERS = ("x_embedder.weight", "img_in.weight")
#: base tensor key -> (base inputs, widened inputs), while a ``merge --expand-base`` runs (None otherwise)
_EXPANDING: ContextVar[dict[str, tuple[int, int]] | None] = ContextVar("loratools_expand_base", default=None)


@contextlib.contextmanager
def expanding_base(on: bool = True) -> Iterator[dict[str, tuple[int, int]]]:
    """While on, a control LoRA's wider img_in/x_embedder is let through here for the merge plan to widen the base
    (``ops/merge/widen.py``); yields what the plan widened (base key -> (old, new) inputs)."""
    widened: dict[str, tuple[int, int]] = {}
    token = _EXPANDING.set(widened if on else None)
    try:
        yield widened
    finally:
        _EXPANDING.reset(token)


def expansion() -> dict[str, tuple[int, int]] | None:
    """The running ``--expand-base`` merge's record of widened tensors, None when no such merge runs."""
    return _EXPANDING.get()


def width_problem(have: int, want: int) -> str | None:
    """Why ``want`` inputs cannot widen a layer of ``have`` (None when they can): wider, and a whole number of
    the base's inputs (Canny/Depth: 2×, Fill: 6× — the latent beside the control image's latent and mask)."""
    if want < have:
        return f"takes {want} inputs, fewer than the base's {have}: it was made for another model"
    if want % have:
        return f"takes {want} inputs, not a multiple of the base's {have}: no control LoRA layout has that width"
    return None


def check_in_width(path: Path, modules: dict[str, LoraModule], base: KeyResolver | None) -> None:
    """Refuses a base whose ``img_in``/``x_embedder`` takes fewer inputs than the file's ``img_in`` LoRA (unless a
    ``merge --expand-base`` reads it and the width is one it can widen to)."""
    if base is None:
        return
    name = next((k for k in modules if k.endswith(("img_in", "transformer.x_embedder"))), None)
    if name is None:
        return
    key = name + ".weight" if name + ".weight" in base.keys() else base.tensor_key(name)
    if key is None:
        return
    have, want = int(base.info(key).shape[1]), modules[name].in_features
    if have == want:
        return
    problem = width_problem(have, want)
    if problem is not None:  # narrower, or no whole number of inputs: no widening makes it fit
        raise ShapeError(f"{path}: img_in lora_A {problem} ({key})", hint="check the base is the model the file "
                         "was trained for (FLUX.1-dev: img_in takes 64 inputs)", path=path)  # fmt: skip
    if expansion() is None:
        raise ShapeError(
            f"{path}: img_in lora_A takes {want} inputs and the base's {key} takes {have}: a BFL control LoRA "
            f"(Canny/Depth) feeds img_in the latent and the control image's latent side by side; merge with "
            f"--expand-base to widen {key} with zero columns",
            hint=f"or merge it into a base whose img_in/x_embedder already takes {want} inputs (a FLUX.1 Canny/Depth "
            "dev checkpoint), or load it with diffusers' FluxControlPipeline, which widens x_embedder the same way",
            path=path,
        )


__all__ = [
    "INPUT_LAYERS", "check_in_width", "expanding_base", "expansion", "is_norm", "norm_replacements", "width_problem",
]  # fmt: skip
