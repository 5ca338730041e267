"""The arithmetic of one merge job (a :class:`~loratools.ops.merge.plan.TensorJob`), in fp32.

``compute`` returns the merged tensor: W' = R or W, + Σ w_i·scale_i·B_i·A_i (in factor space, ``addmm_``),
DoRA rescaling, bias updates, a head's scale. ``apply_inplace`` does the plain LoRA/bias case in place on the
base tensor's own buffer, in row blocks that stay in cache. Both take a stack of experts ``(E, d1, d2)`` whole
or a run of its experts (:mod:`loratools.ops.merge.stacked` hands them one expert at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loratools.errors import NumericError
from loratools.ops.merge import families as fam

if TYPE_CHECKING:
    import torch

#: a plan.TensorJob (not imported: plan imports this module)
TensorJob = Any


def _check_sum(j: TensorJob, w: torch.Tensor) -> None:
    """NaN/Inf check in one cheap pass: a sum of finite values is finite unless it overflows (then look closer)."""
    import torch

    total = w.sum(dtype=torch.float32) if w.dtype != torch.float64 else w.sum()
    if not bool(torch.isfinite(total)) and not bool(torch.isfinite(w).all()):
        raise NumericError(
            f"merging into {j.key} produced NaN or Inf values", hint="the base or the adapter holds extreme values"
        )


#: elements per block of the in-place update (fits in L2 with its fp32 copy)
BLOCK_ELEMENTS = 1 << 18
#: the smallest |fp32| that rounds (to nearest even) to an infinite bf16: bits 0x7f7f8000
_BF16_OVERFLOW = 3.39617752923046e+38


class FiniteCheck:
    """The merged output's finite check, done on each fp32 block while it is in cache: ``ok`` stays True when
    every value is finite and rounds to a finite value of ``dtype`` (bf16 or fp32) — what the writer's sum
    over the rounded tensor (``write._cast_checked``) would otherwise re-read it for.

    One ``dot(x, x)`` per block (4x faster than ``aminmax``, whose NaN-propagating compares are scalar-slow):
    its squares are non-negative, so it is finite only if every value is finite and below 2^64 — far inside
    bf16's range. A block whose sum of squares is not finite gets the exact test (``aminmax``)."""

    def __init__(self, dtype: torch.dtype) -> None:
        import torch

        self.limit = _BF16_OVERFLOW if dtype == torch.bfloat16 else float("inf")
        self.ok = dtype in (torch.bfloat16, torch.float32)

    def see(self, block: torch.Tensor) -> None:
        import math

        import torch

        flat = block.reshape(-1)
        if math.isfinite(float(torch.dot(flat, flat))):
            return
        lo, hi = torch.aminmax(flat)  # NaN anywhere makes both NaN: the comparisons fail
        if not (-self.limit < float(lo) and float(hi) < self.limit):
            self.ok = False


def apply_inplace(
    j: TensorJob,
    w: torch.Tensor,
    scratch: torch.Tensor | None = None,
    first_row: int = 0,
    out: torch.Tensor | None = None,
    check: FiniteCheck | None = None,
) -> torch.Tensor:
    """Plain LoRA/bias updates applied to ``w`` in place, in fp32, rounded once into ``w``'s dtype.

    A half-precision weight is processed in blocks of rows: each block is widened to fp32, gets
    Σ coef·B[rows]·A straight from the factors (``addmm_``, no dense ΔW), and is rounded back, while
    it is still in cache. fp32 weights are updated directly.

    ``first_row``: the row of the whole tensor's (E·d1, d2) view that ``w``'s first row is, when ``w`` is a run
    of experts of a larger stack: the blocks keep the whole tensor's boundaries, so every ``addmm_`` is the
    call the whole-tensor update makes and the result is bit-identical.

    ``out`` (``w``'s shape and dtype): the result goes there and ``w`` is only read (a map of the base file's
    pages: no copy of the base into private memory). ``check`` sees every fp32 block before it is rounded.
    """
    import torch

    stacked = any(c.expert is not None for c in j.deltas)  # experts (E, d1, d2): rows of its (E·d1, d2) view
    res = w if out is None else out

    def rows_of(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, t.shape[-1]) if stacked else t.view(t.shape[0], -1) if t.ndim > 1 else t.view(1, -1)

    mat, omat = rows_of(w), rows_of(res)
    terms = []  # (left, right, coefficient, first row of the tensor it updates)
    for c in j.deltas:
        up, down = c.lora.factors(torch.float32)
        a, b = (down.T, up.T) if c.lora.transposed else (up, down)
        first = c.expert * w.shape[1] if c.expert is not None else 0
        terms.append((a, b, c.coefficient, first + (c.rows[0] if c.rows else 0)))
    if j.biases:  # a bias vector: small, do it whole
        acc = w.to(torch.float32)
        for c in j.biases:
            acc.add_(c.lora.bias.to(torch.float32), alpha=c.coefficient)
        res.copy_(acc)
        if check is not None:
            check.see(acc)
    elif w.dtype == torch.float32:
        if out is not None:
            res.copy_(w)
        for a, b, coef, r0 in terms:
            omat[r0 : r0 + a.shape[0]].addmm_(a, b, alpha=coef)
        if check is not None:
            check.see(res)
    else:
        rows = max(1, BLOCK_ELEMENTS // max(1, mat.shape[1]))
        buf = torch.empty((rows, mat.shape[1]), dtype=torch.float32) if scratch is None else scratch
        buf = buf.view(-1)[: rows * mat.shape[1]].view(rows, mat.shape[1])
        r = 0
        while r < mat.shape[0]:
            blk = mat[r : r + rows - (first_row + r) % rows]
            acc = buf[: blk.shape[0]]
            acc.copy_(blk)
            for a, b, coef, r0 in terms:
                lo, hi = max(r, r0), min(r + blk.shape[0], r0 + a.shape[0])
                if lo < hi:
                    acc[lo - r : hi - r].addmm_(a[lo - r0 : hi - r0], b, alpha=coef)
            if check is not None:
                check.see(acc)
            omat[r : r + blk.shape[0]].copy_(acc)
            r += blk.shape[0]
    if w.dtype == torch.float16:  # the one dtype a sane update can overflow
        _check_sum(j, res)
    return res


def compute(j: TensorJob, base: torch.Tensor | None, device: Any = None) -> torch.Tensor:
    """The merged tensor in fp32 (on CPU). ``base`` is the source tensor (None when replaced)."""
    import torch

    if j.replacement is not None:
        w = j.replacement.to(device=device or "cpu", dtype=torch.float32, copy=True)
    else:
        assert base is not None
        w = base.to(device=device or "cpu", dtype=torch.float32, copy=base.dtype == torch.float32)
    for c in j.deltas:
        if fam.is_family(c):  # LoHa, LoKr, OFT, BOFT, IA3: their own maths (ops/merge/families.py)
            w = fam.apply(c, w)
            continue
        up, down = c.lora.factors(torch.float32)
        up, down = up.to(w.device), down.to(w.device)
        t = w[c.expert] if c.expert is not None else w  # one expert of a stacked tensor: a view into w
        if c.lora.transposed:
            t.addmm_(down.T, up.T, alpha=c.coefficient)
        else:
            r0 = c.rows[0] if c.rows else 0
            t.view(t.shape[0], -1)[r0 : r0 + up.shape[0]].addmm_(up, down, alpha=c.coefficient)
    d = j.dora
    if d is not None:
        mat = d.lora.from_weight_layout(w)
        norm = torch.linalg.vector_norm(mat, dim=1)
        mat.mul_((d.lora.magnitude.to(w.device, torch.float32).reshape(-1) / norm).unsqueeze(1))
    for c in j.biases:
        if fam.is_family(c):
            fam.scale_bias(c, w)
            continue
        w.add_(c.lora.bias.to(w.device, torch.float32), alpha=c.coefficient)
    if j.scale != 1:
        w.mul_(j.scale)
    _check_sum(j, w)
    return w.cpu() if w.device.type != "cpu" else w
