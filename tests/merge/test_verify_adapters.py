"""``verify`` with several adapters names the one that is off (issue 19 item 2.6), and refuses an adapter
whose config rank disagrees with its tensors unless --trust-tensors, as ``merge`` does (item 2.7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from models import run_cli

FIX = Path(__file__).resolve().parents[2] / "fixtures"
BASE = FIX / "bases" / "llama"
A, B = FIX / "peft" / "llama-lora", FIX / "peft" / "llama-patterns"


@pytest.fixture(scope="module")
def flipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merge of A and B with B's sign flipped (weights 0.5,-1)."""
    out = tmp_path_factory.mktemp("verify") / "merged"
    code, _, err = run_cli(["merge", BASE, A, B, "--weights", "0.5,-1", "-o", out])
    assert code == 0, err
    return out


def test_the_flipped_adapter_is_named_with_its_coefficient(flipped: Path) -> None:
    code, out, err = run_cli(["verify", flipped, "--base", BASE, "--adapter", A, "--adapter", B,
                              "--weights", "0.5,1", "--json"])
    assert code == 1, err
    report = json.loads(out)
    assert report["failures"], report
    for f in report["failures"]:  # every tensor B touches, alone or beside A
        assert f["status"] == "sign_flipped", f
        assert f["ratio"] == -1.0
        assert f"adapter 2 ({B})" in f["detail"] and "adapter 1" not in f["detail"], f["detail"]
        assert "coefficient -1 where 1 was expected" in f["detail"]
        assert "merged with weight -1, not 1" in f["detail"]
    both = [f for f in report["failures"] if len(f["modules"]) == 2]
    assert both, "no tensor that both adapters touch was checked"


def test_a_scaled_adapter_is_named(flipped: Path) -> None:
    """Verified with weights 0.5,-0.5: B's stored update is twice what is asked (coefficient 2)."""
    code, out, _ = run_cli(["verify", flipped, "--base", BASE, "--adapter", A, "--adapter", B,
                            "--weights", "0.5,-0.5", "--json"])
    assert code == 1
    failures = json.loads(out)["failures"]
    assert failures and all(f["status"] == "scaling_mismatch" for f in failures), failures
    assert all(f["ratio"] == pytest.approx(2.0, rel=1e-3) and "adapter 2" in f["detail"] for f in failures)
    code, out, err = run_cli(["verify", flipped, "--base", BASE, "--adapter", A, "--adapter", B,
                              "--weights", "0.5,-1"])
    assert code == 0, out + err


def test_verify_refuses_an_ambiguous_rank_unless_trusted(tmp_path: Path) -> None:
    """Config r 8 over rank-4 tensors: what the merge should hold is a guess, so verify does not judge it."""
    adapter = tmp_path / "declared8"
    shutil.copytree(A, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["r"] = 8
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    merged = tmp_path / "merged"
    assert run_cli(["merge", BASE, adapter, "-o", merged, "--trust-tensors"])[0] == 0
    code, out, err = run_cli(["verify", merged, "--base", BASE, "--adapter", adapter])
    assert code == 2 and not out, out  # was: "verified"
    assert err.startswith(f"Error: {adapter}: adapter_config.json declares rank 8 but the tensors have rank 4")
    assert "--trust-tensors" in err
    code, out, err = run_cli(["verify", merged, "--base", BASE, "--adapter", adapter, "--trust-tensors"])
    assert code == 0 and "verified" in out, out + err
