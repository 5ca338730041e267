"""kohya / ModelSpec metadata: what stays true of an edited or a combined adapter.

sd-scripts writes training facts (``ss_*``: output name, learning rate, tag frequencies, comments, …)
and the SAI ModelSpec (``modelspec.*``). An edit of one adapter (resize, rescale) is still that
training's adapter: its facts stay, but the network description must follow the tensors —
``ss_network_dim``/``ss_network_alpha`` (see ``kohya._network_metadata``) and the ``conv_dim``/
``conv_alpha`` entries of ``ss_network_args`` (:func:`network_args`). A combination of adapters is a new
artefact (:func:`combined_metadata`): only what describes the base model and agrees across the inputs
survives, with a new title and ``modelspec.merged_from`` naming the sources.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter

#: keys that describe the base model or how to run the adapter on it, kept when every input agrees
BASE_KEYS = (
    "ss_base_model_version",
    "ss_v2",
    "ss_v_parameterization",
    "ss_sd_model_name",
    "ss_sd_model_hash",
    "ss_new_sd_model_hash",
    "ss_vae_name",
    "ss_vae_hash",
    "ss_new_vae_hash",
    "ss_clip_skip",
    "ss_network_module",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.resolution",
    "modelspec.prediction_type",
    "modelspec.timestep_range",
    "modelspec.encoder_layer",
    "modelspec.license",
)
_CONV_ARGS = ("conv_dim", "conv_alpha")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _parse_args(text: str | None) -> dict[str, object] | None:
    if not text:
        return {}
    try:
        args = json.loads(text)
    except ValueError:
        return None
    return args if isinstance(args, dict) else None


def network_args(adapter: Adapter, current: str | None) -> str | None:
    """``ss_network_args`` with ``conv_dim``/``conv_alpha`` rewritten from ``adapter``'s conv modules.

    The conv rank and alpha (kohya's alpha: rsLoRA's √r folded in) are written when every conv module
    shares them and dropped otherwise (no conv module, or several values); other arguments are kept.
    Returns None when nothing is left, and ``current`` unchanged when it is not a JSON object.
    """
    from loratools.model.adapter import LoraModule

    args = _parse_args(current)
    if args is None:
        return current
    for key in _CONV_ARGS:
        args.pop(key, None)
    convs = [m for m in adapter.modules.values() if isinstance(m, LoraModule) and m.kind == "conv" and m.rank > 0]
    ranks = {m.rank for m in convs}
    alphas = {float(m.alpha) * (math.sqrt(m.rank) if m.use_rslora else 1.0) for m in convs}
    if len(ranks) == 1:
        args["conv_dim"] = str(ranks.pop())
        if len(alphas) == 1:
            args["conv_alpha"] = _num(alphas.pop())
    return json.dumps(args) if args else None


def _title(meta: dict[str, str], label: str) -> str:
    return meta.get("modelspec.title") or meta.get("ss_output_name") or Path(label).stem or label


def combined_metadata(sources: Sequence[dict[str, str]], labels: Sequence[str]) -> dict[str, str]:
    """Fresh metadata for a combination of adapters whose metadata are ``sources`` (files ``labels``).

    Kept: :data:`BASE_KEYS` on which every input agrees, and the ``ss_network_args`` entries they share
    (conv values are rewritten by the writer). New: ``modelspec.title`` (the sources' titles joined by
    " + "), ``modelspec.merged_from`` (their titles) and ``modelspec.date`` when the inputs use ModelSpec.
    Dropped: every training fact of any one input (output name, comments, tags, learning rates, …).
    """
    if not sources:
        return {}
    out = {k: sources[0][k] for k in BASE_KEYS if k in sources[0] and all(s.get(k) == sources[0][k] for s in sources)}
    parsed = [_parse_args(s.get("ss_network_args")) for s in sources]
    if any(s.get("ss_network_args") for s in sources) and all(p is not None for p in parsed):
        shared = {k: v for k, v in parsed[0].items() if k not in _CONV_ARGS and all(p.get(k) == v for p in parsed)}
        out["ss_network_args"] = json.dumps(shared)
    if any(k.startswith("modelspec.") for s in sources for k in s):
        titles = [_title(s, lab) for s, lab in zip(sources, labels, strict=True)]
        out["modelspec.title"] = " + ".join(titles)
        out["modelspec.merged_from"] = ", ".join(titles)
        out["modelspec.date"] = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
        out.setdefault("modelspec.sai_model_spec", "1.0.0")
    return out


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and bytes: whether an edit changed the tensors."""
    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sd_scripts_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as sd-scripts precomputes them for the webui's additional-networks.

    The file is serialized with only the ``ss_*`` metadata; the model hash is the sha256 of everything after
    the header, the legacy hash the first 8 hex digits of the sha256 of 64 KiB at offset 1 MiB.
    """
    from safetensors.torch import save

    data = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header :]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
