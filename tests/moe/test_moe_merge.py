"""Expert LoRAs merged into MoE checkpoints as they lie on disk: per-expert tensors (Qwen3-MoE, Mixtral's
w1/w3/w2) and fused 3-D experts (gpt-oss). The merged model loads in transformers and equals the unmerged
PeftModel on the logits (≤ 1e-5 fp32), after the adapter is shown to move them far beyond that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moe_support import TOL, assert_moe_parity, load_model, logits, make_moe_case, run_cli, sample_ids

from loratools import merge
from loratools.files.safetensors_file import load_file

pytestmark = pytest.mark.filterwarnings("ignore:.*pattern keys did not match")  # PEFT matches module names only

ROUTERS = {"qwen3_moe": "mlp.gate.weight", "mixtral": "mlp.gate.weight", "gpt_oss": "mlp.router.weight"}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
VARIANTS = {
    "qwen3_moe": dict(kind="qwen3_moe"),
    "qwen3_moe-8-patterns": dict(
        kind="qwen3_moe",
        num_experts=8,
        rank_pattern={"model.layers.1.mlp.experts.down_proj": 3, "layers.0.mlp.experts.gate_up_proj": 4},
        alpha_pattern={"down_proj": 9},
    ),
    "qwen3_moe-rslora-router": dict(
        kind="qwen3_moe", use_rslora=True, target_parameters=EXPERTS + [ROUTERS["qwen3_moe"]]
    ),
    "mixtral-router": dict(kind="mixtral", target_parameters=EXPERTS + [ROUTERS["mixtral"]]),
    "gpt_oss-router": dict(kind="gpt_oss", target_parameters=EXPERTS + [ROUTERS["gpt_oss"]]),
    "gpt_oss-8-patterns": dict(kind="gpt_oss", num_experts=8, rank_pattern={"layers.1.mlp.experts.gate_up_proj": 3}),
}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f)[0])
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_merged_moe_matches_unmerged_peft(name: str, tmp_path: Path) -> None:
    case = make_moe_case(tmp_path, **VARIANTS[name])
    out = tmp_path / "merged"
    summary = merge(case.base, [case.adapter], out)
    assert summary.modules_merged > 0
    assert_moe_parity(out, case)
    base, merged = _tensors(case.base), _tensors(out)
    assert sorted(merged) == sorted(base), "the merge changed the checkpoint's on-disk layout"
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".experts." in k or ".gate." in k or ".router." in k for k in changed)
    assert all("self_attn" not in k for k in changed)


def test_per_expert_tensors_get_the_gate_and_up_rows(tmp_path: Path) -> None:
    """Qwen3-MoE on disk: expert e's gate_proj gets rows [:I] of ΔW(gate_up_proj[e]), up_proj rows [I:]."""
    case = make_moe_case(tmp_path, "qwen3_moe", target_parameters=["mlp.experts.gate_up_proj"])
    out = tmp_path / "merged"
    merge(case.base, [case.adapter], out)
    base, merged = _tensors(case.base), _tensors(out)
    wrapper = case.peft.base_model.model.model.layers[1].mlp.experts
    delta = wrapper.get_delta_weight("default").float()  # (E, 2I, H)
    inter = delta.shape[1] // 2
    for e in range(delta.shape[0]):
        for part, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, None))):
            k = f"model.layers.1.mlp.experts.{e}.{part}.weight"
            torch.testing.assert_close(merged[k] - base[k], delta[e, rows], rtol=1e-5, atol=1e-6, msg=k)
    for k in base:
        if "down_proj" in k:
            assert torch.equal(base[k], merged[k])


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_bf16_sharded_base_and_verify(kind: str, tmp_path: Path) -> None:
    """A bf16 base in several shards (the blocked in-place update path) merges and passes --verify."""
    from moe_support import build_moe, moe_peft

    model = build_moe(kind)
    base = tmp_path / "base"
    model.to(torch.bfloat16).save_pretrained(str(base), max_shard_size="40KB")
    assert len(list(base.glob("*.safetensors"))) > 1
    model = model.float()
    moe_peft(model, tmp_path / "lora")
    code, _, err = run_cli(["merge", base, tmp_path / "lora", "-o", tmp_path / "merged", "--verify"])
    assert code == 0, err
    merged, orig = _tensors(tmp_path / "merged"), _tensors(base)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert sum(not torch.equal(orig[k], merged[k]) for k in orig) >= 4


def test_fp32_merge_equals_peft_merge_and_unload(tmp_path: Path) -> None:
    """gpt-oss (fused on disk): the merged 3-D tensors equal PEFT's own merge_and_unload state."""
    import copy

    case = make_moe_case(tmp_path, "gpt_oss")
    out = tmp_path / "merged"
    merge(case.base, [case.adapter], out)
    theirs = copy.deepcopy(case.peft).merge_and_unload().state_dict()
    ours = _tensors(out)
    for k in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    ids = sample_ids(seed=3)
    assert float((logits(load_model(out), ids) - logits(case.peft, ids)).abs().max()) <= TOL


def test_info_with_base_resolves_every_expert(tmp_path: Path) -> None:
    case = make_moe_case(tmp_path, "mixtral", target_parameters=EXPERTS + [ROUTERS["mixtral"]])
    code, out, err = run_cli(["info", case.adapter, "--base", case.base, "--json"])
    assert code == 0, err
    d = json.loads(out)
    assert d["unresolved"] == [] and len(d["experts"]) == 4
