"""LyCORIS algorithms in kohya-style single files (``lora_unet_…``, ``lora_te…_``, ``lycoris_…`` names).

Parts per module (after ``<name>.``) and their rules, checked in lycoris/modules/{loha,lokr,diag_oft}.py,
lycoris/functional/{loha,lokr,diag_oft,general}.py (lycoris-lora 4.1):

- LoHa: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·kh·kw), ``hada_w2_a``, ``hada_w2_b``; Tucker conv adds
  ``hada_t1``/``hada_t2`` (r, r, kh, kw) with ``hada_w*_a`` (r, out), ``hada_w*_b`` (r, in). ``alpha``: scale
  alpha / r (r = rows of ``hada_w1_b``; missing or 0 means alpha = r; rsLoRA is baked into the stored alpha).
- LoKr: ``lokr_w1`` or ``lokr_w1_a``/``_b``; ``lokr_w2`` or ``lokr_w2_a``/``_b`` (conv ``_b`` (r, d, kh, kw)) or
  Tucker ``lokr_t2`` with ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d). Scale alpha / r with r the rank of the
  first factored half; when both halves are full matrices the scale is 1 and ``alpha`` is ignored.
- ``dora_scale``: weight decomposition W' = m·(W + ΔW)/‖W + ΔW‖; shape (out, 1, …) normalizes per output
  row, (1, in, …) per input channel.
- diag-OFT: ``oft_blocks`` (n, b, b) on the output side, optional ``rescale`` (out, 1, …), ``alpha`` the
  constraint (scaled by out; 0 = none).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import FormatError, NumericError, ShapeError, UnsupportedError
from loratools.families import DiagOFTModule, FamilyModule, LoHaModule, LoKrModule

if TYPE_CHECKING:
    import torch

#: tensor parts of the LyCORIS algorithms read here
PARTS = frozenset(
    {
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "hada_t1",
        "hada_t2",
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
        "oft_blocks",
        "rescale",
    }
)


#: the largest |alpha| a file may hold: alpha / r beyond a million has no use and overflows fp16 on the way
MAX_ALPHA = 1e6


def read_alpha(path: Path, name: str, t: torch.Tensor | None) -> float | None:
    """The ``<name>.alpha`` scalar (None when absent); NumericError for NaN/Inf or beyond ±MAX_ALPHA."""
    if t is None:
        return None
    if t.numel() != 1:
        raise FormatError(f"{path}: {name}.alpha has {t.numel()} values; expected a scalar", path=path)
    value = float(t.double().reshape(-1)[0])
    if not math.isfinite(value) or abs(value) > MAX_ALPHA:
        raise NumericError(
            f"{path}: tensor {name}.alpha is {value:g}; an alpha must be a finite number within ±{MAX_ALPHA:g}",
            hint="the file is damaged or was written by a broken tool; re-export it from its training tool",
            path=path,
        )
    return value


def _dora(m: torch.Tensor | None) -> tuple[torch.Tensor | None, str]:
    if m is None:
        return None, "out"
    axis = "in" if m.ndim >= 2 and m.shape[0] == 1 and m.shape[1] > 1 else "out"
    return m, axis  # kept as stored (its shape is written back); the maths reshapes it


def module_from_parts(path: Path, name: str, p: dict[str, torch.Tensor]) -> FamilyModule:
    """The family module of one LyCORIS entry (``p``: part -> tensor, ``alpha``/``dora_scale`` included)."""
    alpha = read_alpha(path, name, p.get("alpha"))
    magnitude, axis = _dora(p.get("dora_scale"))
    what = "LoHa" if "hada_w1_a" in p or "hada_w1_b" in p else ("LoKr" if any("lokr" in k for k in p) else "OFT")
    try:
        if "hada_w1_a" in p:
            tucker = "hada_t1" in p
            return LoHaModule(
                w1a=p["hada_w1_a"],
                w1b=p["hada_w1_b"],
                w2a=p["hada_w2_a"],
                w2b=p["hada_w2_b"],
                alpha=alpha,
                t1=p.get("hada_t1"),
                t2=p.get("hada_t2"),
                kind="conv" if tucker else "linear",
                magnitude=magnitude,
                magnitude_axis=axis,
            )
        if "lokr_w1" in p or "lokr_w1_a" in p:
            conv = any(t.ndim > 2 for k, t in p.items() if k.startswith("lokr_"))
            return LoKrModule.from_parts(
                p,
                alpha=alpha,
                rule="lycoris",
                kind="conv" if conv else "linear",
                magnitude=magnitude,
                magnitude_axis=axis,
            )
        if "oft_blocks" in p:
            blocks = p["oft_blocks"]
            if blocks.ndim != 3:
                raise UnsupportedError(
                    f"{path}: {name}.oft_blocks has shape {tuple(blocks.shape)}: LyCORIS BOFT is not supported "
                    "(diag-OFT (n, b, b) is)",
                    path=path,
                )
            rescale = p.get("rescale")
            return DiagOFTModule(
                blocks=blocks,
                constraint_alpha=alpha or 0.0,
                rescale=rescale,
                kind="conv" if rescale is not None and rescale.ndim > 2 else "linear",
            )
    except KeyError as exc:
        raise FormatError(f"{path}: LyCORIS {what} module {name} has no {exc.args[0]} tensor", path=path) from None
    except ShapeError as exc:
        raise ShapeError(f"{path}: module {name}: {exc.message}", path=path) from None
    raise FormatError(f"{path}: module {name}: {sorted(p)} is no LyCORIS algorithm loratools knows", path=path)


def family_parts(name: str, m: FamilyModule) -> dict[str, torch.Tensor]:
    """The kohya-style parts (``alpha`` included) that make LyCORIS rebuild ``m`` exactly."""
    import torch

    if isinstance(m, DiagOFTModule):
        out = dict(m.tensors())
        out["alpha"] = torch.tensor(float(m.constraint_alpha))
        return out
    if isinstance(m, LoHaModule):
        out = dict(m.tensors())
        out["alpha"] = torch.tensor(m.scale * m.rank)
        return out
    if isinstance(m, LoKrModule):
        out = dict(m.tensors())
        if m.w1 is not None and m.w2 is not None:
            if m.scale != 1.0:  # LyCORIS ignores alpha for two full halves: fold the scale into w1
                out["lokr_w1"] = (m.w1.float() * m.scale).to(m.w1.dtype)
            out["alpha"] = torch.tensor(1.0)
        else:
            out["alpha"] = torch.tensor(m.scale * (m.factored_rank or 1))
        return out
    raise UnsupportedError(
        f"module {name}: a kohya-style file cannot hold a PEFT {m.label} update "
        "(LyCORIS' OFT works on the output side, PEFT's on the input side)",
        hint="keep it a PEFT folder (--to peft), or lower it: loratools convert ADAPTER --to kohya --as-lora "
        "--base BASE -o OUT",
    )
