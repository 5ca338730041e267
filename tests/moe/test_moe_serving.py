"""validate --target vllm|sglang|llama.cpp on expert adapters: what each runtime takes (rules in
ops/validate/serving_rules.json, read in vLLM's and SGLang's MoE LoRA loaders; llama.cpp has none: merge)."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_support import make_moe_case, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:.*pattern keys did not match")


def _findings(adapter: Path, target: str) -> tuple[int, str]:
    code, out, err = run_cli(["validate", adapter, "--target", target])
    assert "Traceback" not in err
    return code, out + err


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_what_each_runtime_takes(kind: str, tmp_path: Path) -> None:
    case = make_moe_case(tmp_path, kind)
    code, text = _findings(case.adapter, "llama.cpp")
    assert code == 1 and "llama.cpp.experts" in text and "no runtime expert LoRA" in text and "merge" in text
    code, text = _findings(case.adapter, "sglang")  # SGLang's lora.py normalizes PEFT's own file itself
    assert code == 0 and "sglang.experts" not in text, text
    code, text = _findings(case.adapter, "vllm")
    assert "vllm.target" not in text, "expert slices are no unknown layer names"
    if kind == "gpt_oss":  # is_3d_moe_weight in vLLM: PEFT's own file is what it loads
        assert code == 0 and "experts_layout" not in text
    else:
        assert code == 1 and "vllm.experts_layout" in text and "--to vllm-moe" in text
        served = tmp_path / "served"
        assert run_cli(["convert", case.adapter, "--to", "vllm-moe", "-o", served])[0] == 0
        for target in ("vllm", "sglang"):
            code, text = _findings(served, target)
            assert code == 0 and "experts" not in text.replace("experts.", ""), text
        code, text = _findings(served, "llama.cpp")
        assert code == 1 and "llama.cpp.experts" in text


def test_vllm_3d_path_needs_both_parameters(tmp_path: Path) -> None:
    case = make_moe_case(tmp_path, "gpt_oss", target_parameters=["mlp.experts.down_proj"])
    code, text = _findings(case.adapter, "vllm")
    assert code == 1 and "vllm.experts_partial" in text and "model.layers.0.mlp.experts" in text


def test_sglang_takes_peft_target_parameters_but_not_a_router_or_rank_pattern(tmp_path: Path) -> None:
    """SGLang's PEFT normalizer (lora.py, pinned by test_peft_paramwrapper_moe_unit.py) refuses more than two
    target_parameters and reshapes with the adapter's one r: a router or a per-parameter rank is an error there,
    with the per-expert layout as the way out."""
    routed = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
    case = make_moe_case(tmp_path / "router", "qwen3_moe", target_parameters=routed)
    code, text = _findings(case.adapter, "sglang")
    assert code == 1 and "sglang.experts_params" in text and "--to vllm-moe" in text
    case = make_moe_case(tmp_path / "pattern", "qwen3_moe", rank_pattern={"model.layers.1.mlp.experts.down_proj": 3})
    code, text = _findings(case.adapter, "sglang")
    assert code == 1 and "sglang.experts_rank" in text and "model.layers.1.mlp.experts.down_proj" in text
    assert "model.layers.0.mlp.experts.down_proj" not in text.split("sglang.experts_rank")[1].split("\n")[0]
