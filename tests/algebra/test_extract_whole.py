"""extract keeps a tensor whole when a low-rank LoRA cannot hold it: a densely changed lm_head is saved
whole (PEFT modules_to_save) by default with the error a LoRA would have had reported; ``save_modules``
saves named modules whole; a head whose change *is* low-rank stays a LoRA."""

from __future__ import annotations

import copy
import json

import models
import pytest
import torch
from algebra_support import peft_outputs
from click.testing import CliRunner

from loratools import extract, load_adapter
from loratools.cli.main import cli


def _tuned(llama, head: str):
    """q_proj/v_proj get a rank-2 delta; lm_head a dense (full-rank) or a rank-1 change."""
    tuned = copy.deepcopy(llama)
    g = torch.Generator().manual_seed(4)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                p.add_(0.3 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g) / 8)
        w = params["lm_head.weight"]
        if head == "dense":
            w.add_(0.2 * torch.randn(w.shape, generator=g))
        else:
            w.add_(0.5 * torch.randn(w.shape[0], 1, generator=g) @ torch.randn(1, w.shape[1], generator=g))
    return tuned.eval()


@pytest.fixture(scope="module")
def dense_head(llama, work):
    tuned = _tuned(llama, "dense")
    models.save_base(llama, work / "wh_base")
    models.save_base(tuned, work / "wh_dense")
    return work / "wh_base", work / "wh_dense", tuned


def test_a_densely_changed_lm_head_is_saved_whole_and_exact(llama, dense_head, work, inputs) -> None:
    base_dir, tuned_dir, tuned = dense_head
    want, base_out = models.outputs(tuned, inputs), models.outputs(llama, inputs)
    assert float((want - base_out).abs().max()) > 0.1  # the fine-tune changes the logits a lot
    res = extract(base_dir, tuned_dir, rank=2, output=work / "wh_x")
    ad = load_adapter(work / "wh_x")
    assert "lm_head" not in ad.modules and "lm_head.weight" in ad.replacements
    whole = {w["name"]: w for w in res.to_dict()["saved_whole"]}
    assert whole["lm_head"]["reason"] == "head" and whole["lm_head"]["lowrank_error"] > 0.5
    # q/v are exactly rank 2 and lm_head is whole: PEFT reproduces the fine-tune
    got = peft_outputs(llama, work / "wh_x", inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_save_modules_keeps_named_modules_whole(llama, dense_head, work) -> None:
    base_dir, tuned_dir, _ = dense_head
    res = extract(base_dir, tuned_dir, rank=2, save_modules=r"layers\.0\.self_attn\.q_proj")
    ad = res.adapter
    assert "model.layers.0.self_attn.q_proj.weight" in ad.replacements
    assert "model.layers.0.self_attn.q_proj" not in ad.modules and "model.layers.1.self_attn.q_proj" in ad.modules
    reasons = {w["name"]: w["reason"] for w in res.to_dict()["saved_whole"]}
    assert reasons["model.layers.0.self_attn.q_proj"] == "--save-module"


def test_a_head_with_a_low_rank_change_stays_lora(llama, dense_head, work) -> None:
    tuned = _tuned(llama, "rank1")
    models.save_base(llama, work / "wh_base1")
    models.save_base(tuned, work / "wh_rank1")
    res = extract(work / "wh_base1", work / "wh_rank1", rank=2)
    assert "lm_head" in res.adapter.modules and "lm_head.weight" not in res.adapter.replacements
    # and a head error bound of 1 never saves a head whole, whatever the error
    base_dir, tuned_dir, _ = dense_head  # the fixture's files (this test ran first on a worker and found none)
    dense = extract(base_dir, tuned_dir, rank=2, head_error=1.0)
    assert "lm_head" in dense.adapter.modules


def test_cli_save_module_and_report(dense_head, work) -> None:
    base_dir, tuned_dir, _ = dense_head
    args = ["extract", str(base_dir), str(tuned_dir), "--rank", "2", "--save-module", "v_proj", "-o", str(work / "c")]
    r = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    names = {w["name"] for w in data["saved_whole"]}
    assert names == {"lm_head", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}
    r = CliRunner().invoke(cli, [*args, "--overwrite"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "lm_head" in r.output and "saved whole" in r.output
