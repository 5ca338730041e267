"""combine: exact cat, svd = best rank-R of the exact sum, linear's cross terms, ties/dare as PEFT's."""

from __future__ import annotations

import pytest
import torch
from algebra_support import best_rank, dense, make_adapter, peft_outputs, toy_inputs, with_deltas
from click.testing import CliRunner

from loratools import combine, load_adapter
from loratools.cli.main import cli
from loratools.errors import UnsupportedError, UsageError

W = (0.7, -1.3)


def _sum(ads, weights, name):
    return sum(w * dense(a.modules[name]) for w, a in zip(weights, ads, strict=True) if name in a.modules)


def test_cat_is_exact_and_loads_in_peft(llama, llama_adapter, llama_adapter_b, work, inputs):
    import models

    out_dir = work / "cat"
    combine([llama_adapter, llama_adapter_b], weights=W, method="cat", output=out_dir)
    ads = [load_adapter(llama_adapter), load_adapter(llama_adapter_b)]
    out = load_adapter(out_dir)
    for name, m in out.modules.items():
        ref = _sum(ads, W, name)
        assert m.rank == 8 + 6
        assert torch.allclose(dense(m), ref, atol=1e-6 * float(ref.abs().max())), name
    deltas = {n: m.to_weight_layout(_sum(ads, W, n).float()) for n, m in ads[0].modules.items()}
    expect = models.outputs(with_deltas(llama, deltas), inputs)
    assert float((expect - models.outputs(llama, inputs)).abs().max()) > 1e-2
    assert torch.allclose(peft_outputs(llama, out_dir, inputs), expect, atol=1e-4)


def test_svd_is_best_rank_of_exact_sum(toy, toy_adapter, work):
    other = make_adapter(toy, work / "toy_b", kind="llama", r=4, lora_alpha=3, seed=21, target_modules=["lin", "conv"])
    out_dir = work / "toy_svd"
    combine([toy_adapter, other], weights=W, method="svd", rank=3, output=out_dir)
    ads = [load_adapter(toy_adapter), load_adapter(other)]
    out = load_adapter(out_dir)
    assert set(out.modules) == {"emb", "conv", "lin"}
    for name, m in out.modules.items():
        ref = best_rank(_sum(ads, W, name), 3)
        assert m.rank == 3
        assert torch.allclose(dense(m), ref, atol=1e-5 * float(ref.abs().max())), name
    deltas = {n: m.to_weight_layout(dense(m).float()) for n, m in out.modules.items()}
    with torch.no_grad():
        expect = with_deltas(toy, deltas)(*toy_inputs())
    assert torch.allclose(peft_outputs(toy, out_dir, toy_inputs()), expect, atol=1e-4)


def test_linear_adds_cross_terms(llama_adapter, llama_adapter_b, work, llama):
    b = make_adapter(llama, work / "llama_r8b", r=8, lora_alpha=4, seed=13)
    ads = [load_adapter(llama_adapter), load_adapter(b)]
    out = combine([llama_adapter, b], weights=(0.5, 2.0), method="linear")
    for name, m in out.modules.items():
        c = [w * a.modules[name].scale for w, a in zip((0.5, 2.0), ads, strict=True)]
        f = [a.modules[name].factors(torch.float64) for a in ads]
        up = sum(ci**0.5 * fi[0] for ci, fi in zip(c, f, strict=True))
        down = sum(ci**0.5 * fi[1] for ci, fi in zip(c, f, strict=True))
        assert torch.allclose(dense(m), up @ down, atol=1e-5)
        assert not torch.allclose(dense(m), _sum(ads, (0.5, 2.0), name), atol=1e-3)  # not the weighted sum
    with pytest.raises(UsageError, match="equal ranks"):
        combine([llama_adapter, llama_adapter_b], method="linear")  # the fixture: under xdist no other test made it


def test_ties_matches_peft_merge_utils(llama_adapter, llama_adapter_b):
    from peft.utils import merge_utils

    ads = [load_adapter(llama_adapter), load_adapter(llama_adapter_b)]
    out = combine([llama_adapter, llama_adapter_b], weights=W, method="ties", density=0.4, rank=5)
    for name, m in out.modules.items():
        mixed = merge_utils.ties([dense(a.modules[name]).float() for a in ads], torch.tensor(W), density=0.4)
        ref = best_rank(mixed, 5)
        assert torch.allclose(dense(m), ref, atol=1e-5 * float(ref.abs().max())), name


def test_dare_is_seeded_and_reduces_to_task_arithmetic(llama_adapter, llama_adapter_b):
    paths = [llama_adapter, llama_adapter_b]
    one = combine(paths, weights=W, method="dare_ties", density=0.5, seed=3)
    two = combine(paths, weights=W, method="dare_ties", density=0.5, seed=3)
    other = combine(paths, weights=W, method="dare_ties", density=0.5, seed=4)
    name = next(iter(one.modules))
    assert torch.equal(one.modules[name].up, two.modules[name].up)
    assert not torch.allclose(dense(one.modules[name]), dense(other.modules[name]))
    ads = [load_adapter(p) for p in paths]
    full = combine(paths, weights=W, method="dare_linear", density=1.0, rank=14)  # no drop: the exact sum
    for n, m in full.modules.items():
        ref = _sum(ads, W, n)
        assert torch.allclose(dense(m), ref, atol=1e-5 * float(ref.abs().max()))
    # dare_linear keeps the sum in expectation: the mean over seeds approaches it
    runs = [
        dense(combine(paths, weights=W, method="dare_linear", density=0.5, rank=32, seed=s).modules[name])
        for s in range(8)
    ]
    ref = _sum(ads, W, name)
    err_mean = float(torch.linalg.matrix_norm(torch.stack(runs).mean(0) - ref))
    err_one = float(torch.linalg.matrix_norm(runs[0] - ref))
    assert err_mean < 0.6 * err_one


def test_cli_and_refusals(llama_adapter, llama_adapter_b, work, llama):
    r = CliRunner().invoke(
        cli,
        [
            "combine",
            str(llama_adapter),
            str(llama_adapter_b),
            "--weights",
            "1,0.5",
            "--method",
            "svd",
            "--rank",
            "4",
            "-o",
            str(work / "cli_svd"),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert load_adapter(work / "cli_svd").ranks() == {4}
    dora = make_adapter(llama, work / "dora_c", r=4, lora_alpha=4, use_dora=True, seed=5)
    with pytest.raises(UnsupportedError, match="DoRA"):
        combine([llama_adapter, dora])
    with pytest.raises(UsageError, match="density"):
        combine([llama_adapter, llama_adapter_b], method="ties")
