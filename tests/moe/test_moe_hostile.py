"""Broken expert adapters that need the MoE base to be refused (a wrong expert count, rank_pattern against the
base's count, a dense base, square experts of unknown layout): exit 2 and one ``Error:`` line naming the file and
the field, nothing written, no traceback. Those refused when read are in tests/reliability/hostile_moe.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from moe_support import TOL, build_moe, load_model, logits, moe_peft, run_cli, sample_ids

from loratools.files.safetensors_file import load_file, save_file

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
A0 = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"  # down_proj of layer 0 (outer wrapper)
B0 = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"
ALL = ("info", "info-base", "merge")


def _config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        cfg = json.loads((folder / CONFIG).read_text())
        edit(cfg)
        (folder / CONFIG).write_text(json.dumps(cfg))

    return mutate


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        tensors, meta = load_file(folder / WEIGHTS)
        tensors = {k: v.clone() for k, v in tensors.items()}
        edit(tensors)
        save_file(tensors, str(folder / WEIGHTS), metadata=meta)

    return mutate


def _set(key: str, index: tuple[int, int], value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key][index] = value

    return edit


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Path], None]
    expect: tuple[str, ...]  # substrings of the one Error: line (the file's path is checked always)
    commands: tuple[str, ...] = ALL
    file: str = WEIGHTS  # the file the line must name


#: the cases that need the MoE base itself; those refused when read are in tests/reliability/hostile_moe.py
CASES = [
    Case(
        "wrong-expert-count",
        _config(lambda c: c.update(r=1)),
        ("8 experts x rank 1", "config.json says 4 experts", "(num_"),
        ("info-base", "merge"),
    ),
    Case(
        "rank-pattern-contradicts-base",
        _config(lambda c: c.update(rank_pattern={"layers.0.mlp.experts.down_proj": 4})),
        ("2 experts x rank 4", "config.json says 4 experts", "rank_pattern"),
        ("info-base", "merge"),
    ),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A Qwen3-MoE base (4 experts), a good expert adapter for it (r=2, both expert parameters), and an
    8-expert base."""
    root = tmp_path_factory.mktemp("moe-good")
    model = build_moe("qwen3_moe")
    model.save_pretrained(str(root / "base"))
    moe_peft(model, root / "lora")
    build_moe("qwen3_moe", num_experts=8).save_pretrained(str(root / "base8"))
    return root / "base", root / "lora", root / "base8"


def _argv(command: str, adapter: Path, base: Path, out: Path) -> list:
    return {
        "info": ["info", adapter],
        "info-base": ["info", adapter, "--base", base],
        "merge": ["merge", base, adapter, "-o", out],
    }[command]


def _refused(argv: list, out: Path, expect: tuple[str, ...], named: Path) -> None:
    code, stdout, err = run_cli(argv)
    assert code == 2, f"{argv[0]} exited {code}: {stdout}{err}"
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err.lower(), err
    for s in (*expect, str(named)):
        assert s in lines[0], f"{s!r} not in: {lines[0]}"
    assert not out.exists(), "a refused command wrote its output"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_expert_adapter_is_refused(case: Case, good: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, lora, _ = good
    bad = tmp_path / "bad"
    shutil.copytree(lora, bad)
    case.mutate(bad)
    for command in case.commands:
        _refused(_argv(command, bad, base, tmp_path / "out"), tmp_path / "out", case.expect, bad / case.file)


def test_wrong_base_expert_count_is_refused(good: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, lora, base8 = good
    _refused(["merge", base8, lora, "-o", tmp_path / "out"], tmp_path / "out", ("4 experts", "8 experts"), lora)


def test_dense_base_is_refused_naming_what_was_looked_for(good: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A base without the expert tensors (here: gpt-oss-shaped tensors renamed away) names the keys it tried."""
    _, lora, _ = good
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    tensors, meta = load_file(base / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if "layers.1.mlp.experts" not in k}
    save_file(kept, str(base / "model.safetensors"), metadata=meta)
    out = tmp_path / "out"
    expect = ("model.layers.1.mlp.experts", "no tensor in the base", "experts.0.down_proj.weight")
    _refused(["merge", base, lora, "-o", out], out, expect, lora)


def test_unknown_model_type_with_square_experts_is_refused(tmp_path: Path) -> None:
    """Neither the adapter (no auto_mapping) nor the base (an unknown model_type) says how a fused parameter
    stores its experts: a non-square stack decides by its shape, a square one is refused, never guessed."""
    model = build_moe("gpt_oss", intermediate_size=32)  # down_proj (E, 32, 32): square per expert
    base = tmp_path / "base"
    model.save_pretrained(str(base))
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "model_type": "my_moe"}))
    for targets, ok in ((["mlp.experts.gate_up_proj"], True), (["mlp.experts.down_proj"], False)):
        lora = tmp_path / f"lora-{ok}"
        pm = moe_peft(model, lora, target_parameters=targets)
        acfg = json.loads((lora / CONFIG).read_text())
        (lora / CONFIG).write_text(json.dumps({**acfg, "auto_mapping": None}))
        out = tmp_path / f"out-{ok}"
        if ok:
            code, _, err = run_cli(["merge", base, lora, "-o", out])
            assert code == 0, err
            (out / "config.json").write_text(json.dumps(cfg))  # back to gpt_oss, to load it in transformers
            ids = sample_ids()
            assert float((logits(load_model(out), ids) - logits(pm, ids)).abs().max()) <= TOL
        else:
            _refused(["merge", base, lora, "-o", out], out, ("square per expert", "(out, in) or (in, out)"), lora)
