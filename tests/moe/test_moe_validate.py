"""``validate`` on expert adapters: clean against the base they were trained on (patterns on parameter paths
are used, wrappers are not 'untargeted'), and a base whose experts cannot take them is an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_support import make_moe_case, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:.*pattern keys did not match")


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_validate_against_its_base_is_clean(kind: str, tmp_path: Path) -> None:
    router = "mlp.router.weight" if kind == "gpt_oss" else "mlp.gate.weight"
    case = make_moe_case(
        tmp_path,
        kind,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", router],
        rank_pattern={"layers.1.mlp.experts.down_proj": 3},
        alpha_pattern={"gate_up_proj": 3},
    )
    code, out, err = run_cli(["validate", case.adapter, "--base", case.base])
    assert code == 0, out + err
    assert "OK, no problems found" in out
    code, out, err = run_cli(["validate", case.adapter])
    assert code == 0 and "unused_pattern" not in out, out + err


def test_validate_names_an_expert_layout_the_base_cannot_take(tmp_path: Path) -> None:
    """A gpt-oss adapter (experts stored (in, out)) against a Qwen3-MoE base (per-expert linears)."""
    gpt = make_moe_case(tmp_path / "g", "gpt_oss")
    qwen = make_moe_case(tmp_path / "q", "qwen3_moe")
    code, out, err = run_cli(["validate", gpt.adapter, "--base", qwen.base, "--allow-other-base"])
    assert code == 1, out + err
    assert "expert_layout" in out and "(in, out)" in out and str(gpt.adapter) in out
