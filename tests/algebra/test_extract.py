"""extract: truncation error within 1% of the optimum (exact and randomized), PEFT loads the result."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import models
import pytest
import torch
from algebra_support import dense, peft_outputs
from click.testing import CliRunner

from loratools import extract, load_adapter
from loratools.cli.main import cli
from loratools.model.lowrank import select_rank

CHANGED = ("q_proj", "v_proj", "down_proj")


def _finetune(model, seed=0, conv1d=False):
    """A 'fine-tune': decaying low-rank deltas plus a noise floor on some weights, one norm changed."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            leaf = name.rsplit(".", 2)[-2]
            if name.endswith(".weight") and (leaf in CHANGED or (conv1d and leaf == "c_attn")):
                r = 8
                s = 0.2 * 0.6 ** torch.arange(r, dtype=torch.float32)
                u = torch.randn(p.shape[0], r, generator=g)
                v = torch.randn(r, p.shape[1], generator=g)
                p.add_((u * s) @ v / p.shape[1] ** 0.5 + 1e-3 * torch.randn(p.shape, generator=g))
            if conv1d and name.endswith("h.0.attn.c_attn.bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        norm = "model.norm.weight" if not conv1d else "transformer.ln_f.weight"
        dict(tuned.named_parameters())[norm].mul_(1.1)
    return tuned.eval()


@pytest.fixture(scope="module")
def pair(llama, work):
    models.save_base(llama, work / "x_base")
    tuned = _finetune(llama)
    models.save_base(tuned, work / "x_tuned")
    return work / "x_base", work / "x_tuned", tuned


def _dense_delta(base, tuned, name):
    w0 = dict(base.named_parameters())[f"{name}.weight"]
    w1 = dict(tuned.named_parameters())[f"{name}.weight"]
    return (w1 - w0).detach().double()


def _check_error(llama, tuned, ad, k_of=None, bound=1.01):
    for name, m in ad.modules.items():
        d = _dense_delta(llama, tuned, name)
        d = d.T if m.fan_in_fan_out else d
        s = torch.linalg.svdvals(d)
        k = m.rank if k_of is None else k_of(s)
        assert m.rank == k
        optimal = float(s[k:].square().sum().sqrt())
        err = float(torch.linalg.matrix_norm(d - dense(m)))
        assert err <= bound * optimal + 1e-7, (name, err, optimal)


def test_extract_exact_error_and_peft(llama, pair, work, inputs):
    base_dir, tuned_dir, tuned = pair
    res = extract(base_dir, tuned_dir, rank=4, output=work / "x_r4")
    ad = load_adapter(work / "x_r4")
    assert set(n.rsplit(".", 1)[-1] for n in ad.modules) == set(CHANGED)
    assert len(ad.modules) == 6 and ad.ranks() == {4}
    assert list(ad.replacements) == ["model.norm.weight"] and res.replaced == ["model.norm.weight"]
    n_tensors = len(dict(llama.named_parameters()))
    assert len(res.skipped) == n_tensors - 7 and "lm_head.weight" in res.skipped  # unchanged: skipped
    _check_error(llama, tuned, ad, bound=1.0 + 1e-6)  # exact SVD: optimal
    # PEFT loads it; outputs equal the base + extracted deltas + the replaced norm
    from algebra_support import with_deltas

    expect_model = with_deltas(llama, {n: m.delta() for n, m in ad.modules.items()})
    with torch.no_grad():
        dict(expect_model.named_parameters())["model.norm.weight"].copy_(ad.replacements["model.norm.weight"])
    expect = models.outputs(expect_model, inputs)
    got = peft_outputs(llama, work / "x_r4", inputs)
    assert float((expect - models.outputs(llama, inputs)).abs().max()) > 1e-2
    assert torch.allclose(got, expect, atol=1e-4)
    # and it approximates the fine-tune itself
    assert float((got - models.outputs(tuned, inputs)).abs().max()) < 0.2 * float(
        (models.outputs(tuned, inputs) - models.outputs(llama, inputs)).abs().max()
    )


def test_extract_randomized_within_one_percent(llama, pair):
    base_dir, tuned_dir, tuned = pair
    res = extract(base_dir, tuned_dir, rank=4, threshold=8)  # every matrix above the threshold
    _check_error(llama, tuned, res.adapter, bound=1.01)


def test_extract_fro_rule_and_filters(llama, pair):
    base_dir, tuned_dir, tuned = pair
    res = extract(base_dir, tuned_dir, fro=0.95, include=r"layers\.1\.", exclude="down_proj")
    assert set(res.adapter.modules) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    _check_error(llama, tuned, res.adapter, k_of=lambda s: select_rank(s, "fro", 0.95), bound=1.0 + 1e-6)
    assert res.adapter.replacements == {}


def test_extract_gpt2_conv1d_and_bias(gpt2, work, inputs):
    models.save_base(gpt2, work / "g_base")
    tuned = _finetune(gpt2, conv1d=True)
    models.save_base(tuned, work / "g_tuned")
    r = CliRunner().invoke(
        cli,
        ["extract", str(work / "g_base"), str(work / "g_tuned"), "--rank", "8", "-o", str(work / "g_x"), "--json"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert {m["name"] for m in data["modules"]} == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    ad = load_adapter(work / "g_x")
    assert all(m.fan_in_fan_out for m in ad.modules.values())
    assert ad.modules["transformer.h.0.attn.c_attn"].bias is not None
    got = peft_outputs(gpt2, work / "g_x", inputs)
    from algebra_support import with_deltas

    expect_model = with_deltas(gpt2, {n: m.delta() for n, m in ad.modules.items()})
    params = dict(expect_model.named_parameters())
    with torch.no_grad():
        for n, m in ad.modules.items():
            if m.bias is not None:
                params[f"{n}.bias"].add_(m.scale * m.bias)
        for key, t in ad.replacements.items():
            params[key].copy_(t)
    assert set(ad.replacements) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert torch.allclose(got, models.outputs(expect_model, inputs), atol=1e-4)
    want, base = models.outputs(tuned, inputs), models.outputs(gpt2, inputs)
    # rank 8 holds the whole low-rank part; only (most of) the 1e-3 noise floor is lost
    assert float((got - want).abs().max()) < 0.1 * float((want - base).abs().max())


def test_a_bf16_fine_tune_of_an_fp32_base_extracts_only_the_changed_modules(tmp_path) -> None:
    """Tensors that are only the base rounded to bf16 are unchanged, not LoRA modules of rounding noise."""
    from loratools import merge

    fixtures = Path(__file__).resolve().parents[2] / "fixtures"
    adapter = load_adapter(fixtures / "peft" / "llama-lora")
    tuned = tmp_path / "tuned-bf16"
    merge(fixtures / "bases" / "llama", [fixtures / "peft" / "llama-lora"], tuned, dtype="bf16")
    result = extract(fixtures / "bases" / "llama", tuned, rank=4, output=tmp_path / "extracted")
    assert set(result.adapter.modules) == set(adapter.modules)
    assert not result.adapter.replacements
