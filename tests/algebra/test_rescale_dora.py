"""``rescale --scale`` scales the merged *effect* W′ − W (issue 19 item 2.5): a DoRA module's merge
m·(W+ΔW)/‖W+ΔW‖ and a modules_to_save tensor do not scale with ΔW, so without --base they are refused,
and with --base they become exact plain LoRA of W′ − W first. PEFT's own merges are the oracle."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from models import run_cli

FIX = Path(__file__).resolve().parents[2] / "fixtures"
BASE = FIX / "bases" / "llama"


def _merged(adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of ``adapter`` into the base: every weight."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(BASE), str(adapter))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def base_weights() -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    return {k: v.detach().clone() for k, v in LlamaForCausalLM.from_pretrained(BASE).state_dict().items()}


@pytest.fixture(scope="module")
def trained_mts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-mts with a trained lm_head copy (the committed one equals the base's)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("mts") / "adapter"
    shutil.copytree(FIX / "peft" / "llama-mts", path)
    sd = load_file(path / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(3)
    key = "base_model.model.lm_head.weight"
    sd[key] = sd[key] + 0.05 * torch.randn(sd[key].shape, generator=g)
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def _assert_scaled(scaled: dict, full: dict, base: dict, s: float) -> None:
    changed = 0
    for k, w in base.items():
        want = w + s * (full[k] - w)
        err = float((scaled[k] - want).abs().max())
        assert err <= 1e-5 * max(float((full[k] - w).abs().max()), 1e-6), (k, err)
        changed += bool((full[k] != w).any())
    assert changed > 0


@pytest.mark.parametrize("case", ["llama-dora", "mts"])
def test_scale_is_refused_without_base(case: str, trained_mts: Path, tmp_path: Path) -> None:
    adapter = trained_mts if case == "mts" else FIX / "peft" / case
    code, out, err = run_cli(["rescale", adapter, "--scale", "0.5", "-o", tmp_path / "half"])
    assert code == 2 and not out, out  # was: written, its effect 37% off the halved one (DoRA)
    first = err.splitlines()[0]
    assert "rescale --scale 0.5" in first and ("DoRA module" in first or "lm_head.weight" in first), first
    assert "--base" in err and "--as-lora" in err
    assert not (tmp_path / "half").exists()


@pytest.mark.parametrize("case", ["llama-dora", "mts"])
@pytest.mark.parametrize("s", [0.5, -1.5])
def test_scale_with_base_scales_the_merged_effect(case, s, trained_mts, base_weights, tmp_path) -> None:  # noqa: ANN001
    adapter = trained_mts if case == "mts" else FIX / "peft" / case
    out = tmp_path / "scaled"
    code, stdout, err = run_cli(["rescale", adapter, "--scale", s, "--base", BASE, "-o", out, "--json"])
    assert code == 0, err
    data = json.loads(stdout)
    assert data["lowered"], data
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg["use_dora"] and not cfg["modules_to_save"]
    _assert_scaled(_merged(out), _merged(adapter), base_weights, s)


def test_naive_dora_scaling_is_far_off(base_weights) -> None:  # noqa: ANN001
    """Why DoRA is refused: its ΔW scaled by 0.5 merges far from the halved effect (the old result)."""
    from loratools import load_adapter
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.ops.merge.plan import build_plan, compute
    from loratools.ops.rescale import rescale_module

    dora = load_adapter(FIX / "peft" / "llama-dora")
    half = copy.copy(dora)
    half.modules = {n: rescale_module(m, scale=0.5) for n, m in dora.modules.items()}
    reader = open_checkpoint(BASE)
    full, naive = build_plan(reader, [dora], [1.0]), build_plan(reader, [half], [1.0])
    worst = 0.0
    for key, job in full.jobs.items():
        w = reader.get(job.source).float()
        want = w + 0.5 * (compute(job, w) - w)
        got = compute(naive.jobs[key], w)
        worst = max(worst, float((got - want).norm() / (want - w).norm()))
    assert worst > 0.1, worst
