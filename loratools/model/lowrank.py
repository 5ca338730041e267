"""Linear algebra of low-rank products ΔW = s·B·A without forming the dense out×in matrix.

The spectrum of ``s·B·A`` (B: out×r, A: r×in) is that of the r×r core ``s·R_B·R_Aᵀ`` where
``B = Q_B·R_B`` and ``Aᵀ = Q_A·R_A``: with ``R_B·R_Aᵀ = U_c·Σ·V_cᵀ`` the SVD of the product is
``(Q_B·U_c)·Σ·(Q_A·V_c)ᵀ``. The R factors come from the fp64 Gram matrices ``BᵀB`` and ``A·Aᵀ``
(scaled Cholesky-QR, via a symmetric eigendecomposition so that rank-deficient factors work); when the
column-normalized Gram matrix is too ill-conditioned for that (κ > 1e6) Householder QR is used instead.
Frobenius norms and inner products of low-rank products come from r×r Gram matrices too. Everything
is accumulated in fp64 (the factors are thin), so singular values agree with an independent fp64
computation to ~1e-15 relative to σ_max.

Also here: the truncation rules (rank / fro / ratio / cumulative), the parameter-budget allocation,
and a randomized SVD (oversampling + power iterations) for dense deltas (``extract``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loratools.args.numeric_args import AT_LEAST_ONE, FRACTION, POSITIVE_INT, check_number
from loratools.errors import UsageError
from loratools.model.adapter import LoraModule, scale_for

#: relative eigenvalue cut for Cholesky-QR: directions below it carry < 1e-7 of the factor's norm
_EIG_CUT = 1e-14
#: beyond this Gram condition number Householder QR is used (κ(B)² > 1e12)
_GRAM_COND_LIMIT = 1e12
RULES = ("rank", "fro", "ratio", "cumulative")


@dataclass
class LowRankSVD:
    """The thin SVD of ``scale·B·A`` kept in factored form: U = left·u_core, Vᵀ = v_coreᵀ·right."""

    s: torch.Tensor  # singular values of scale·B·A, descending, fp64
    _left: torch.Tensor  # out×p: an orthonormal basis of range(B) (or B·T for Cholesky-QR)
    _u: torch.Tensor  # p×k
    _right: torch.Tensor  # in×q
    _v: torch.Tensor  # q×k
    sign: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def truncated(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_k, σ_k, V_kᵀ)`` in fp64 with ``sign`` folded into U_k."""
        u = (self._left @ self._u[:, :k]) * self.sign
        vh = (self._right @ self._v[:, :k]).T
        return u, self.s[:k], vh

    def split(self, k: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(B', A')`` of the best rank-k approximation with ``scale·B'·A'`` equal to it.

        Each σ is split as √σ between the two factors (after dividing out ``|scale|``), so B' and A'
        have the same column/row norms.
        """
        u, s, vh = self.truncated(k)
        if scale == 0:
            raise UsageError("cannot split into factors for a zero scale")
        root = torch.sqrt(s / abs(scale))
        sign = -1.0 if scale < 0 else 1.0
        return u * root * sign, root[:, None] * vh


def _gram_r(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For x (n×r), ``(R, T)`` with xᵀx = RᵀR (R: p×r) and x·T (n×p) orthonormal; None if ill-conditioned.

    Columns are normalized first (scaled Cholesky-QR), so factors whose columns merely differ in size by
    many orders of magnitude (a fast-decaying spectrum) stay on this fast path.
    """
    d = torch.linalg.vector_norm(x, dim=0)
    d = torch.where(d > 0, d, torch.ones_like(d))
    lam, vec = torch.linalg.eigh((x / d).T @ (x / d))
    top = float(lam[-1]) if lam.numel() else 0.0
    if top <= 0:
        return x.new_zeros((0, x.shape[1])), x.new_zeros((x.shape[1], 0))
    keep = lam > top * _EIG_CUT
    kept = lam[keep]
    if float(kept.min()) < top / _GRAM_COND_LIMIT:
        return None
    root = torch.sqrt(kept)
    vec = vec[:, keep]
    return root[:, None] * vec.T * d, vec / root / d[:, None]


def _orth_r(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(basis, R, coef)``: x = (x·coef)·R, or Householder ``Q`` with coef None-equivalent (identity)."""
    fast = _gram_r(x)
    if fast is not None:
        r, t = fast
        return x, r, t
    q, r = torch.linalg.qr(x)
    return q, r, torch.eye(q.shape[1], dtype=x.dtype, device=x.device)


def lowrank_svd(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> LowRankSVD:
    """The SVD of ``scale·up·down`` (up: out×r, down: r×in, any float dtype) from the factors alone."""
    b = up.reshape(up.shape[0], -1).to(torch.float64)
    a = down.reshape(down.shape[0], -1).to(torch.float64)
    xb, rb, tb = _orth_r(b)
    xa, ra, ta = _orth_r(a.T)
    core = rb @ ra.T
    if core.numel() == 0:
        empty = b.new_zeros((0,))
        return LowRankSVD(
            empty, b.new_zeros((b.shape[0], 0)), b.new_zeros((0, 0)), a.new_zeros((a.shape[1], 0)), a.new_zeros((0, 0))
        )
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    return LowRankSVD(
        s=s * abs(scale),
        _left=xb,
        _u=tb @ uc,
        _right=xa,
        _v=ta @ vch.T,
        sign=-1.0 if scale < 0 else 1.0,
    )


def module_svd(module: LoraModule) -> LowRankSVD:
    """The SVD of a module's ΔW = scale·B·A as an out×in matrix (conv flattened to out × in·kh·kw)."""
    up, down = module.factors(torch.float64)
    return lowrank_svd(up, down, module.scale)


def singular_values(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """σ of ``scale·up·down``, descending (fp64)."""
    return lowrank_svd(up, down, scale).s


# -- norms and inner products from r×r Gram matrices ------------------------------------------------


def inner(up1: torch.Tensor, down1: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor) -> float:
    """⟨B₁A₁, B₂A₂⟩_F = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ), in fp64 (r₁×r₂ work)."""
    b1, b2 = up1.reshape(up1.shape[0], -1).double(), up2.reshape(up2.shape[0], -1).double()
    a1, a2 = down1.reshape(down1.shape[0], -1).double(), down2.reshape(down2.shape[0], -1).double()
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


def fro_norm(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> float:
    """‖scale·B·A‖_F from the Gram matrices."""
    return abs(scale) * math.sqrt(max(inner(up, down, up, down), 0.0))


def module_norm(module: LoraModule) -> float:
    """‖ΔW‖_F of a module."""
    up, down = module.factors(torch.float64)
    return fro_norm(up, down, module.scale)


def module_inner(m1: LoraModule, m2: LoraModule) -> float:
    """⟨ΔW₁, ΔW₂⟩_F of two modules over the same weight."""
    u1, d1 = m1.factors(torch.float64)
    u2, d2 = m2.factors(torch.float64)
    return m1.scale * m2.scale * inner(u1, d1, u2, d2)


def difference_norm(m1: LoraModule, m2: LoraModule) -> float:
    """‖ΔW₁ − ΔW₂‖_F without cancellation: R factors of the stacked factors [s₁B₁, −s₂B₂], [A₁; A₂]."""
    u1, d1 = m1.factors(torch.float64)
    u2, d2 = m2.factors(torch.float64)
    up = torch.cat([u1 * m1.scale, -u2 * m2.scale], dim=1)
    down = torch.cat([d1, d2], dim=0)
    _, rb = torch.linalg.qr(up)
    _, ra = torch.linalg.qr(down.T)
    return float(torch.linalg.matrix_norm(rb @ ra.T))


# -- truncation rules --------------------------------------------------------------------------------


def select_rank(s: torch.Tensor, rule: str, value: float) -> int:
    """The rank a rule keeps for descending singular values ``s``.

    ``rank``: min(value, len). ``fro``: the smallest k with √(Σ_{i<k}σ²/Σσ²) ≥ value. ``ratio``: the
    number of σ ≥ σ_max/value. ``cumulative``: the smallest k with Σ_{i<k}σ/Σσ ≥ value. An all-zero
    spectrum keeps 0.
    """
    s = s.to(torch.float64)
    n = int(s.numel())
    if n == 0 or float(s[0]) <= 0:
        return 0
    if rule == "rank":
        return max(0, min(int(value), n))
    if rule == "ratio":
        return int((s >= float(s[0]) / value).sum())
    if rule == "fro":
        energy = torch.cumsum(s * s, 0)
        target = value * value * float(energy[-1])
    elif rule == "cumulative":
        energy = torch.cumsum(s, 0)
        target = value * float(energy[-1])
    else:
        raise UsageError(f"unknown truncation rule {rule!r}; expected one of {', '.join(RULES)}")
    # the first k whose cumulative sum reaches the target (1-based); a guard for rounding at value 1
    k = int(torch.searchsorted(energy, torch.tensor(target * (1 - 1e-12), dtype=torch.float64)).item()) + 1
    return min(k, n)


def check_rule(rule: str, value: float) -> None:
    """Raise UsageError for values out of range for ``rule``."""
    allowed = {"rank": POSITIVE_INT, "fro": FRACTION, "cumulative": FRACTION, "ratio": AT_LEAST_ONE}.get(rule)
    if allowed is not None:
        check_number(f"--{rule}", value, allowed)


def energy_rank(s: torch.Tensor, fraction: float) -> int:
    """The smallest k keeping ``fraction`` of the energy Σσ² (0 for a zero spectrum)."""
    return select_rank(s, "fro", math.sqrt(fraction))


def retained_fro(s: torch.Tensor, k: int) -> float:
    """√(Σ_{i<k}σ²/Σσ²): the fraction of the Frobenius norm a rank-k truncation keeps (1 for zero)."""
    s = s.to(torch.float64)
    total = float((s * s).sum())
    if total <= 0:
        return 1.0
    return math.sqrt(float((s[:k] * s[:k]).sum()) / total)


def effective_rank(s: torch.Tensor) -> float:
    """exp of the entropy of σ/Σσ (Roy & Vetterli); 0 for a zero spectrum."""
    s = s.to(torch.float64)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def allocate_budget(
    spectra: Mapping[str, torch.Tensor],
    cost: Mapping[str, int],
    budget: int,
    max_rank: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Per-module ranks keeping the most energy with Σ rank·cost ≤ ``budget``.

    Greedy over σ_i²/cost (cost = parameters per rank: out + in): singular values are taken in that
    order across all modules; since σ is descending within a module each module keeps a prefix. A
    module whose next σ does not fit is closed (its later σ cost the same), others go on.
    """
    ranks = {name: 0 for name in spectra}
    heap: list[tuple[float, str, int]] = []
    for name, s in spectra.items():
        if s.numel() and float(s[0]) > 0:
            heap.append((-(float(s[0]) ** 2) / cost[name], name, 0))
    heapq.heapify(heap)
    left = int(budget)
    while heap:
        _, name, i = heapq.heappop(heap)
        c = cost[name]
        cap = (max_rank or {}).get(name, spectra[name].numel())
        if c > left or i >= cap:
            continue
        left -= c
        ranks[name] = i + 1
        s = spectra[name]
        if i + 1 < s.numel() and float(s[i + 1]) > 0:
            heapq.heappush(heap, (-(float(s[i + 1]) ** 2) / c, name, i + 1))
    return ranks


def alpha_for_scale(scale: float, rank: int, use_rslora: bool = False) -> float:
    """The alpha giving ``scale`` at ``rank``: scale·r, or scale·√r for rsLoRA."""
    return scale * (math.sqrt(rank) if use_rslora else rank)


def rebuild(module: LoraModule, up: torch.Tensor, down: torch.Tensor, alpha: float) -> LoraModule:
    """A copy of ``module`` with 2-D factors (out×k, k×in) reshaped to its layout and cast to its dtype."""
    k = int(down.shape[0])
    new_down = down.reshape(k, *module.down.shape[1:]).to(module.down.dtype).contiguous()
    new_up = up.reshape(module.up.shape[0], k, *module.up.shape[2:]).to(module.up.dtype).contiguous()
    return module.with_factors(new_down, new_up, alpha=alpha)


def truncate_module(module: LoraModule, svd: LowRankSVD, k: int) -> LoraModule:
    """The best rank-k approximation of ``module``, same scale convention (alpha/r or alpha/√r kept)."""
    scale = module.scale
    alpha = alpha_for_scale(scale, k, module.use_rslora)
    up, down = svd.split(k, scale)
    return rebuild(module, up, down, alpha)


def scale_of(module: LoraModule) -> float:
    """The module's effective multiplier (``scale_for`` of its alpha and rank)."""
    return scale_for(module.alpha, module.rank, module.use_rslora)


# -- dense deltas (extract, ties/dare) ------------------------------------------------------------


def randomized_svd(
    m: torch.Tensor,
    rank: int,
    *,
    oversample: int = 16,
    n_iter: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko–Martinsson–Tropp: a rank-``rank`` SVD of ``m`` with ``oversample`` extra columns and
    ``n_iter`` power iterations (re-orthonormalized each time), in ``m``'s dtype (use fp32 or fp64)."""
    rows, cols = m.shape
    ell = min(rank + oversample, rows, cols)
    omega = torch.randn(cols, ell, dtype=m.dtype, device=m.device, generator=generator)
    q, _ = torch.linalg.qr(m @ omega)
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(m.T @ q)
        q, _ = torch.linalg.qr(m @ z)
    small = q.T @ m
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ u
    return u[:, :rank], s[:rank], vh[:rank]


def dense_svd(
    m: torch.Tensor,
    rank: int | None = None,
    fro: float | None = None,
    *,
    exact: bool = False,
    threshold: int = 1024,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A truncated SVD of a dense matrix: exact when ``min(m.shape) <= threshold`` or ``exact``,
    randomized above. With ``fro`` the rank is the smallest keeping that Frobenius fraction (the
    randomized sketch grows until it does, else falls back to the exact SVD)."""
    small = min(m.shape)
    if exact or small <= threshold:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        k = select_rank(s, "fro", fro) if fro is not None else min(int(rank or small), small)
        return u[:, :k], s[:k], vh[:k]
    if fro is None:
        k = min(int(rank or small), small)
        if 2 * k >= small:
            return dense_svd(m, k, exact=True)
        return randomized_svd(m, k, generator=generator)
    total = float(torch.linalg.matrix_norm(m).double() ** 2)
    guess = 32
    while 2 * guess < small:
        u, s, vh = randomized_svd(m, guess, generator=generator)
        energy = torch.cumsum(s.double() ** 2, 0)
        if total <= 0 or float(energy[-1]) >= fro * fro * total:
            k = (
                0
                if total <= 0
                else int(torch.searchsorted(energy, torch.tensor(fro * fro * total * (1 - 1e-12), dtype=torch.float64)))
                + 1
            )
            k = min(k, guess)
            return u[:, :k], s[:k], vh[:k]
        guess *= 2
    return dense_svd(m, fro=fro, exact=True)
