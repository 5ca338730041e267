"""Fused projections and their parts, exactly: one LoRA on a fused weight (q, k and v stacked by rows) and one
LoRA per part are the same update written two ways.

- **split**: the parts share A and take their rows of B — ΔW_i = s·B[rows_i]·A, exact. A part whose rows of B
  are zero outside one run of rank columns (a fused LoRA built from parts, below) keeps only that run, so a
  split of a fuse gives the parts back with their own ranks; alpha follows the rank so the scale is unchanged.
- **fuse**: parts that share one A (equal tensors, equal ranks) give back A and their Bs stacked; otherwise A's
  are stacked and B is block-diagonal (rank = the sum of the ranks). A part's scale differing from the first
  part's is folded into its block of B; a part no module gives is zero rows.
"""

from __future__ import annotations

import math

import torch

from loratools.errors import UnsupportedError
from loratools.model.adapter import LoraModule


def _alpha_for(m: LoraModule, rank: int) -> float:
    """The alpha that gives ``m``'s scale at ``rank``."""
    if rank == m.rank:
        return float(m.alpha)
    ratio = math.sqrt(rank / m.rank) if m.use_rslora else rank / m.rank
    return float(m.alpha) * ratio


def _plain(m: LoraModule, where: str) -> None:
    if m.kind != "linear" or m.magnitude is not None or m.bias is not None or m.fan_in_fan_out:
        what = "DoRA" if m.magnitude is not None else "a LoRA bias" if m.bias is not None else f"a {m.kind} LoRA"
        raise UnsupportedError(f"{where} is {what}; only plain linear LoRA splits or fuses exactly across layouts")


def split(m: LoraModule, rows: list[int], where: str) -> list[LoraModule | None]:
    """The parts of fused module ``m`` whose rows of the weight are ``rows`` (in order); None for a part whose
    rows of B are all zero (it changes nothing: a part the fused LoRA was built without)."""
    _plain(m, where)
    out, start = [], 0
    for n in rows:
        up = m.up[start : start + n]
        start += n
        down, rank = m.down, m.rank
        if not up.is_meta:
            used = (up != 0).any(dim=0)
            if not bool(used.any()):
                out.append(None)
                continue
            if not bool(used.all()):
                idx = used.nonzero().flatten()
                lo, hi = int(idx[0]), int(idx[-1]) + 1
                if not bool(used[:lo].any()) and not bool(used[hi:].any()):
                    up, down, rank = up[:, lo:hi], down[lo:hi], hi - lo
        out.append(LoraModule(down=down, up=up.contiguous() if not up.is_meta else up,
                              alpha=_alpha_for(m, rank), use_rslora=m.use_rslora))  # fmt: skip
    return out


def fuse(parts: list[LoraModule | None], rows: list[int], where: str) -> LoraModule:
    """One module on the fused weight from its parts (None: a part without a LoRA, ``rows[i]`` zero rows)."""
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("fuse needs at least one part")
    for p in present:
        _plain(p, where)
    first = present[0]
    rslora = {p.use_rslora for p in present}
    if len(rslora) > 1:
        raise UnsupportedError(f"{where}: its parts mix rsLoRA and plain LoRA scales; they cannot share one alpha")
    dtype = first.up.dtype
    shared = all(p.rank == first.rank and torch.equal(p.down, first.down) for p in present)
    rank = first.rank if shared else sum(p.rank for p in present)
    ups, col = [], 0
    for p, n in zip(parts, rows, strict=True):
        width = rank if shared else (p.rank if p is not None else 0)
        if p is None:
            ups.append(torch.zeros((n, rank), dtype=dtype))
            continue
        up = p.up if p.scale == first.scale else (p.up.float() * (p.scale / first.scale)).to(dtype)
        if shared:
            ups.append(up)
        else:
            block = torch.zeros((n, rank), dtype=dtype)
            block[:, col : col + width] = up
            ups.append(block)
            col += width
    down = first.down if shared else torch.cat([p.down for p in present], dim=0)
    return LoraModule(down=down, up=torch.cat(ups, dim=0), alpha=_alpha_for(first, rank), use_rslora=first.use_rslora)


def swap_halves(m: LoraModule) -> LoraModule:
    """``m`` with the two halves of its output rows exchanged (an involution)."""
    half = m.out_features // 2
    return m.with_factors(m.down, torch.cat([m.up[half:], m.up[:half]], dim=0).contiguous())


__all__ = ["fuse", "split", "swap_halves"]
