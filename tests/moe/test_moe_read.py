"""PEFT ``target_parameters`` adapters read into one LoRA per expert, each held against PEFT's own
``ParamWrapper.get_delta_weight`` slice by slice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moe_support import build_moe, make_moe_case, moe_peft, run_cli, wrappers

from loratools import load_adapter
from loratools.model.experts import ExpertLoraModule, expert_key

pytestmark = pytest.mark.filterwarnings("ignore:.*pattern keys did not match")  # PEFT matches module names only

VARIANTS = {
    "qwen3_moe": dict(kind="qwen3_moe"),
    "qwen3_moe-patterns": dict(
        kind="qwen3_moe",
        num_experts=8,
        rank_pattern={"model.layers.1.mlp.experts.down_proj": 3, "gate_up_proj": 4},
        alpha_pattern={"layers.0.mlp.experts.down_proj": 11},
    ),
    "qwen3_moe-rslora-router": dict(
        kind="qwen3_moe", use_rslora=True, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                              "mlp.gate.weight"]
    ),
    "mixtral": dict(kind="mixtral"),
    "gpt_oss": dict(kind="gpt_oss", target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                       "mlp.router.weight"]),
    "down-only": dict(kind="qwen3_moe", target_parameters=["mlp.experts.down_proj"]),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_expert_delta_equals_peft(name: str, tmp_path: Path) -> None:
    case = make_moe_case(tmp_path, **VARIANTS[name])
    adapter = load_adapter(case.adapter)
    theirs = wrappers(case.peft)
    assert theirs, "PEFT wrapped nothing"
    seen = set()
    for path, wrapper in theirs.items():
        delta = wrapper.get_delta_weight("default").float()
        if delta.ndim == 2:  # a router weight: an ordinary LoRA of its module
            module = path.rpartition(".")[0]
            torch.testing.assert_close(adapter.modules[module].delta(), delta, rtol=1e-6, atol=1e-7)
            seen.add(module)
            continue
        assert delta.shape[0] == wrapper.num_experts
        for e in range(wrapper.num_experts):
            m = adapter.modules[expert_key(path, e)]
            assert isinstance(m, ExpertLoraModule) and (m.parameter, m.expert) == (path, e)
            assert m.rank == wrapper.r["default"] and m.scale == pytest.approx(wrapper.scaling["default"])
            torch.testing.assert_close(m.delta(), delta[e], rtol=1e-6, atol=1e-7, msg=f"{path}[{e}]")
            assert float(m.delta().abs().max()) > 0
            seen.add(m.key)
    assert seen == set(adapter.modules), "the reader made modules PEFT has no wrapper for"
    if "rank_pattern" in VARIANTS[name]:  # the patterns took effect on the parameter paths (PEFT warns they did not)
        assert adapter.ranks() == {2, 3, 4}


def test_info_shows_experts(tmp_path: Path) -> None:
    case = make_moe_case(tmp_path, "qwen3_moe", num_experts=8, rank_pattern={"layers.1.mlp.experts.down_proj": 3})
    code, out, err = run_cli(["info", case.adapter, "--json"])
    assert code == 0, err
    d = json.loads(out)
    groups = {g["parameter"]: g for g in d["experts"]}
    params = ("down_proj", "gate_up_proj")
    assert sorted(groups) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in params]
    g = groups["model.layers.1.mlp.experts.down_proj"]
    assert (g["num_experts"], g["rank"], g["touched"], g["layout"]) == (8, 3, list(range(8)), "(E, out, in)")
    assert groups["model.layers.0.mlp.experts.gate_up_proj"]["out_features"] == 48  # 2 x moe_intermediate_size
    code, out, err = run_cli(["info", case.adapter, "--base", case.base])
    assert code == 0, err
    assert "experts" in out and "8 experts" in out and "not in base" not in out


def test_untouched_experts_are_named(tmp_path: Path) -> None:
    """An expert whose slice of B is zero is not 'touched' (PEFT trains them all; a pruned export may not)."""
    from loratools.files.safetensors_file import load_file, save_file

    case = make_moe_case(tmp_path, "qwen3_moe", target_parameters=["mlp.experts.down_proj"])
    f = case.adapter / "adapter_model.safetensors"
    tensors, meta = load_file(f)
    key = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][:, 1::4] = 0  # expert 1 of 4 (columns k·E + 1)
    save_file(tensors, str(f), metadata=meta)
    d = json.loads(run_cli(["info", case.adapter, "--json"])[1])
    layer0 = next(g for g in d["experts"] if g["parameter"] == "model.layers.0.mlp.experts.down_proj")
    assert layer0["touched"] == [0, 2, 3]


def test_writing_expert_slices_is_refused(tmp_path: Path) -> None:
    """A format with no place for expert slices (mlx-lm) refuses them; peft and vllm-moe write them (test_moe_write)."""
    case = make_moe_case(tmp_path, "qwen3_moe")
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", case.adapter, "--to", "mlx", "-o", out])
    assert code == 2 and "expert LoRA" in err and "experts.down_proj[0]" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1
    assert not out.exists()


def test_nesting_follows_registration_not_config_order(tmp_path: Path) -> None:
    """A config listing down_proj first still has gate_up_proj as the inner wrapper (registered first)."""
    model = build_moe("qwen3_moe")
    pm = moe_peft(model, tmp_path / "lora", target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])
    cfg_file = tmp_path / "lora" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    for order in (sorted(cfg["target_parameters"]), sorted(cfg["target_parameters"], reverse=True)):
        cfg_file.write_text(json.dumps({**cfg, "target_parameters": order}))
        adapter = load_adapter(tmp_path / "lora")
        _same_as_peft(pm, adapter)


def _same_as_peft(pm, adapter) -> None:  # noqa: ANN001
    inner = pm.base_model.model.model.layers[0].mlp.experts.base_layer
    assert inner.parameter_name == "gate_up_proj"
    want = inner.get_delta_weight("default").float()
    got = adapter.modules[expert_key("model.layers.0.mlp.experts.gate_up_proj", 3)].delta()
    torch.testing.assert_close(got, want[3], rtol=1e-6, atol=1e-7)
