"""loratools.model.lowrank against dense torch.linalg (fp64) as the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from loratools import lowrank as lr


def factors(out, r, inn, seed=0, decay=0.6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out, r, generator=g) * decay ** torch.arange(r, dtype=torch.float32)
    down = torch.randn(r, inn, generator=g)
    return up.to(dtype), down.to(dtype)


@pytest.mark.parametrize(
    ("out", "r", "inn", "scale"),
    [(64, 8, 48, 1.5), (40, 12, 30, -0.3), (10, 16, 50, 2.0), (50, 16, 10, 1.0), (300, 32, 200, 0.25)],
)
def test_lowrank_svd_matches_dense(out, r, inn, scale):
    up, down = factors(out, r, inn, seed=out)
    d = scale * up.double() @ down.double()
    s_dense = torch.linalg.svdvals(d)
    svd = lr.lowrank_svd(up, down, scale)
    k = svd.rank
    assert k == min(out, r, inn)
    assert torch.allclose(svd.s, s_dense[:k], rtol=0, atol=1e-12 * float(s_dense[0]))
    for j in (1, 3, k):
        u, s, vh = svd.truncated(j)
        assert torch.allclose(
            (u * s) @ vh,
            (lambda u_, s_, v_: (u_[:, :j] * s_[:j]) @ v_[:j])(*torch.linalg.svd(d, full_matrices=False)),
            atol=1e-10 * float(s_dense[0]),
        )
        b, a = svd.split(j, scale)
        assert torch.allclose(scale * b @ a, (u * s) @ vh, atol=1e-12 * float(s_dense[0]))
        # √σ split: columns of B' and rows of A' have equal norms
        assert torch.allclose(b.norm(dim=0) * math.sqrt(abs(scale)), a.norm(dim=1) * math.sqrt(abs(scale)))


def test_rank_deficient_and_zero_factors():
    up, down = factors(60, 6, 40)
    up2, down2 = torch.cat([up, up], 1), torch.cat([down, 2 * down], 0)  # rank 6 stored as rank 12
    s = lr.lowrank_svd(up2, down2).s
    ref = torch.linalg.svdvals(up2.double() @ down2.double())
    assert torch.allclose(s[:6], ref[:6], rtol=1e-10)
    assert s.numel() <= 6 or float(s[6:].abs().max()) < 1e-6 * float(s[0])
    zero = lr.lowrank_svd(torch.zeros(5, 3), torch.randn(3, 4))
    assert zero.rank == 0 and lr.select_rank(zero.s, "fro", 0.9) == 0


def test_norms_and_inner_products():
    u1, d1 = factors(70, 5, 30, seed=1)
    u2, d2 = factors(70, 9, 30, seed=2)
    a, b = u1.double() @ d1.double(), u2.double() @ d2.double()
    assert math.isclose(lr.inner(u1, d1, u2, d2), float((a * b).sum()), rel_tol=1e-10)
    assert math.isclose(lr.fro_norm(u1, d1, -2.0), 2 * float(torch.linalg.matrix_norm(a)), rel_tol=1e-10)


def _dense_rule(s, rule, value):
    """The smallest k satisfying the rule, by brute force over the dense spectrum."""
    s = s.double()
    for k in range(0, s.numel() + 1):
        if rule == "fro" and math.sqrt(float((s[:k] ** 2).sum() / (s**2).sum())) >= value:
            return k
        if rule == "cumulative" and float(s[:k].sum() / s.sum()) >= value:
            return k
    return s.numel()


@pytest.mark.parametrize("value", [0.3, 0.6, 0.83, 0.95, 0.999])
@pytest.mark.parametrize("rule", ["fro", "cumulative"])
def test_minimal_rank_rules(rule, value):
    up, down = factors(80, 16, 64, seed=3)
    s_dense = torch.linalg.svdvals(up.double() @ down.double())[:16]
    k = lr.select_rank(lr.lowrank_svd(up, down).s, rule, value)
    assert k == _dense_rule(s_dense, rule, value)
    # minimal: k keeps enough, k-1 does not
    measure = (
        (lambda j: math.sqrt(float((s_dense[:j] ** 2).sum() / (s_dense**2).sum())))
        if rule == "fro"
        else (lambda j: float(s_dense[:j].sum() / s_dense.sum()))
    )
    assert measure(k) >= value and measure(k - 1) < value


@pytest.mark.parametrize("ratio", [1.0, 2.0, 7.5, 100.0])
def test_ratio_rule(ratio):
    up, down = factors(80, 16, 64, seed=4)
    s_dense = torch.linalg.svdvals(up.double() @ down.double())[:16]
    k = lr.select_rank(lr.lowrank_svd(up, down).s, "ratio", ratio)
    assert k == int((s_dense >= s_dense[0] / ratio).sum())
    assert float(s_dense[k - 1]) >= float(s_dense[0]) / ratio
    if k < 16:
        assert float(s_dense[k]) < float(s_dense[0]) / ratio


def test_budget_never_exceeds_and_beats_uniform():
    spectra, cost = {}, {}
    shapes = [(64, 64), (128, 32), (32, 200), (96, 96), (256, 64), (48, 48)]
    for i, (o, n) in enumerate(shapes):
        up, down = factors(o, 16, n, seed=10 + i, decay=0.5 + 0.08 * i)
        spectra[f"m{i}"] = lr.lowrank_svd(up * (1 + i), down).s
        cost[f"m{i}"] = o + n
    total = {n: float((s**2).sum()) for n, s in spectra.items()}
    for uniform in (1, 2, 4, 8):
        budget = uniform * sum(cost.values())
        ranks = lr.allocate_budget(spectra, cost, budget)
        used = sum(ranks[n] * cost[n] for n in ranks)
        assert used <= budget
        kept = sum(float((spectra[n][: ranks[n]] ** 2).sum()) for n in ranks)
        kept_uniform = sum(float((spectra[n][:uniform] ** 2).sum()) for n in ranks)
        assert kept > kept_uniform
        assert kept <= sum(total.values())
    # odd budgets too, and max_rank caps
    for budget in (0, 77, 1000, 12345):
        ranks = lr.allocate_budget(spectra, cost, budget, {n: 3 for n in spectra})
        assert sum(ranks[n] * cost[n] for n in ranks) <= budget
        assert max(ranks.values()) <= 3


def test_effective_and_energy_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    p = s / s.sum()
    assert math.isclose(lr.effective_rank(s), math.exp(float(-(p * p.log()).sum())))
    assert lr.energy_rank(s, 0.9) == 2  # 16+4 = 20 of 22 = 0.909
    assert lr.energy_rank(s, 0.95) == 3
    assert math.isclose(lr.retained_fro(s, 1), math.sqrt(16 / 22))


def test_randomized_svd_within_one_percent_of_optimal():
    g = torch.Generator().manual_seed(0)
    # a fine-tuning-like delta: a decaying low-rank part plus a noise floor
    u = torch.linalg.qr(torch.randn(600, 60, generator=g))[0]
    v = torch.linalg.qr(torch.randn(400, 60, generator=g))[0]
    s = 10 * 0.9 ** torch.arange(60, dtype=torch.float32)
    m = (u * s) @ v.T + 0.01 * torch.randn(600, 400, generator=g)
    full = torch.linalg.svdvals(m.double())
    for k in (4, 16, 32):
        optimal = float(full[k:].square().sum().sqrt())
        uu, ss, vh = lr.randomized_svd(m, k, generator=torch.Generator().manual_seed(1))
        err = float(torch.linalg.matrix_norm((m - (uu * ss) @ vh).double()))
        assert err <= 1.01 * optimal, (k, err, optimal)
    # the dispatcher: exact below the threshold, randomized above, fro-driven rank
    uu, ss, vh = lr.dense_svd(m, fro=0.9, threshold=100, generator=torch.Generator().manual_seed(1))
    k = ss.numel()
    assert k == lr.select_rank(full, "fro", 0.9)


def test_nearly_collinear_factors_use_householder():
    up, down = factors(50, 4, 30, seed=8)
    g = torch.Generator().manual_seed(9)
    up = torch.cat([up, up[:, :1] + 3e-7 * torch.randn(50, 1, generator=g)], 1).double()  # Gram κ ~ 1e13
    down = torch.cat([down, torch.randn(1, 30, generator=g)], 0).double()
    assert lr._gram_r(up) is None  # too ill-conditioned for Cholesky-QR
    ref = torch.linalg.svdvals(up @ down)
    got = lr.lowrank_svd(up, down).s
    assert torch.allclose(got, ref[: got.numel()], atol=1e-12 * float(ref[0]))
