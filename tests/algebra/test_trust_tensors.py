"""One rule for every reader of an adapter whose config rank disagrees with its tensors (issue 19 item 2.7):
``spectrum`` and ``diff`` refuse it like ``merge`` (their σ and norms depend on the ambiguous scale
alpha/r) unless --trust-tensors, which takes the tensors' rank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from models import run_cli

FIX = Path(__file__).resolve().parents[2] / "fixtures"
LORA = FIX / "peft" / "llama-lora"


@pytest.fixture(scope="module")
def declared_8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("amb") / "adapter"
    shutil.copytree(LORA, path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    cfg["r"] = 8
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "args", [lambda a: ["spectrum", a], lambda a: ["diff", a, LORA], lambda a: ["diff", LORA, a]],
    ids=["spectrum", "diff-a", "diff-b"],
)
def test_readers_refuse_then_trust(args, declared_8: Path) -> None:  # noqa: ANN001
    code, out, err = run_cli(args(declared_8))
    assert code == 2 and not out, out  # was: a table computed at alpha / tensor rank
    assert err.startswith(f"Error: {declared_8}: adapter_config.json declares rank 8 but the tensors have rank 4")
    assert "the scale alpha/r is ambiguous" in err and "--trust-tensors" in err
    code, out, err = run_cli([*args(declared_8), "--trust-tensors", "--json"])
    assert code == 0, err
    data = json.loads(out)
    if args(declared_8)[0] == "diff":  # trusted: scale = alpha / tensor rank, the consistent adapter's
        assert all(m["relative_difference"] == pytest.approx(0.0, abs=1e-6) for m in data["modules"])
    else:
        ref = json.loads(run_cli(["spectrum", LORA, "--json"])[1])
        assert [m["singular_values"] for m in data["modules"]] == [m["singular_values"] for m in ref["modules"]]
