"""rescale, diff and spectrum against dense torch.linalg; PEFT loads rescaled outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from algebra_support import dense, peft_outputs
from click.testing import CliRunner

from loratools import diff, load_adapter, rescale, spectrum
from loratools.cli.main import cli
from loratools.errors import UsageError


@pytest.mark.parametrize("s", [0.5, -1.7, 3.0])
def test_rescale_scale_is_exact(llama_adapter, work, s):
    out_dir = work / f"scale_{s}"
    rescale(llama_adapter, scale=s, output=out_dir)
    src, out = load_adapter(llama_adapter), load_adapter(out_dir)
    for n, m in src.modules.items():
        new = out.modules[n]
        assert torch.equal(new.down, m.down)  # factors untouched (up at most negated): bit-exact
        assert torch.equal(new.up, m.up if s > 0 else -m.up)
        assert torch.allclose(dense(new), s * dense(m), rtol=1e-12, atol=0)


def test_rescale_scale_in_peft(llama, llama_adapter, work, inputs):
    import models
    from algebra_support import with_deltas

    out_dir = work / "scale_peft"
    rescale(llama_adapter, scale=-0.8, output=out_dir)
    src = load_adapter(llama_adapter)
    expect = models.outputs(with_deltas(llama, {n: -0.8 * m.delta() for n, m in src.modules.items()}), inputs)
    got = peft_outputs(llama, out_dir, inputs)
    assert float((expect - models.outputs(llama, inputs)).abs().max()) > 1e-2
    assert torch.allclose(got, expect, atol=1e-4)


def test_rescale_alpha_keeps_delta(rslora_adapter, work, toy_adapter):
    for adapter, alpha in ((rslora_adapter, 16.0), (toy_adapter, 6.0)):
        out_dir = work / f"alpha_{adapter.name}"
        rescale(adapter, alpha=alpha, output=out_dir)
        src, out = load_adapter(adapter), load_adapter(out_dir)
        assert out.alphas() == {alpha}
        for n, m in src.modules.items():
            ref = dense(m)
            assert torch.allclose(dense(out.modules[n]), ref, atol=1e-6 * float(ref.abs().max()))
    with pytest.raises(UsageError):
        rescale(toy_adapter, scale=0)
    with pytest.raises(UsageError):
        rescale(toy_adapter, scale=2, alpha=3)


def test_diff_numbers_match_dense(llama_adapter, work):
    rescale(llama_adapter, scale=1.25, output=work / "diff_b")
    b_ad = load_adapter(work / "diff_b")
    b_ad.modules.pop("model.layers.0.mlp.up_proj")
    from loratools.ops.resize import resize

    other = resize(llama_adapter, rank=3).adapter
    a_ad = load_adapter(llama_adapter)
    rep = diff(a_ad, other)
    for row in rep["modules"]:
        da, db = dense(a_ad.modules[row["name"]]), dense(other.modules[row["name"]])
        na, nb = float(torch.linalg.matrix_norm(da)), float(torch.linalg.matrix_norm(db))
        assert math.isclose(row["norm_a"], na, rel_tol=1e-9) and math.isclose(row["norm_b"], nb, rel_tol=1e-9)
        assert math.isclose(row["relative_difference"], float(torch.linalg.matrix_norm(da - db)) / na, rel_tol=1e-7)
        assert math.isclose(row["cosine"], float((da * db).sum()) / (na * nb), rel_tol=1e-9)
        assert row["rank_a"] == 8 and row["rank_b"] == 3
    rels = [r["relative_difference"] for r in rep["modules"]]
    assert rels == sorted(rels, reverse=True)
    rep2 = diff(a_ad, b_ad)
    assert rep2["only_in_a"] == ["model.layers.0.mlp.up_proj"] and rep2["only_in_b"] == []
    for row in rep2["modules"]:
        assert math.isclose(row["relative_difference"], 0.25, rel_tol=1e-6)
        assert math.isclose(row["cosine"], 1.0, rel_tol=1e-9)


def test_diff_cli_json_schema(llama_adapter, llama_adapter_b):
    r = CliRunner().invoke(cli, ["diff", str(llama_adapter), str(llama_adapter_b), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert set(data) >= {"schema_version", "modules", "only_in_a", "only_in_b", "config"}
    assert set(data["modules"][0]) >= {
        "name",
        "rank_a",
        "rank_b",
        "norm_a",
        "norm_b",
        "relative_difference",
        "cosine",
    }
    assert data["config"]["ranks"] == {"a": [8], "b": [6]}
    r = CliRunner().invoke(cli, ["diff", str(llama_adapter), str(llama_adapter_b)], catch_exceptions=False)
    assert "rel diff" in r.output and "config ranks" in r.output


def test_spectrum_matches_dense(toy_adapter, llama_adapter, work):
    data = spectrum(toy_adapter)
    src = load_adapter(toy_adapter)
    for row in data["modules"]:
        s = torch.linalg.svdvals(dense(src.modules[row["name"]]))[: len(row["singular_values"])]
        assert torch.allclose(torch.tensor(row["singular_values"], dtype=torch.float64), s, rtol=1e-9)
        p = s / s.sum()
        assert math.isclose(row["effective_rank"], math.exp(float(-(p * p.log()).sum())), rel_tol=1e-9)
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        for level, k in row["energy_ranks"].items():
            assert energy[k - 1] >= float(level) - 1e-12 and (k == 1 or energy[k - 2] < float(level))
    r = CliRunner().invoke(
        cli, ["spectrum", str(llama_adapter), "--json", "--plot", str(work / "energy.png")], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["summary"]["modules"] == 8 and (work / "energy.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(cli, ["spectrum", str(llama_adapter)], catch_exceptions=False)
    assert "eff. rank" in r.output and "r95" in r.output
