"""The DoRA fixture tells DoRA from LoRA (issue 14.12).

PEFT initialises a DoRA magnitude to ‖W + ΔW‖ row-wise, so an untrained adapter merges the same with
or without it, and code that ignored the magnitude passed every output test. fixtures/make_fixtures.py
now perturbs the magnitudes as training would; these tests fail if the magnitude were dropped.
"""

from __future__ import annotations

import torch
from foundation_support import adapter_dir, base_dir, load_peft

from loratools import load_adapter, merge
from loratools.files.safetensors_file import load_file

DORA = adapter_dir("llama-dora")


def _weight_norm(w: torch.Tensor) -> torch.Tensor:
    return w.float().norm(dim=1)


def test_the_magnitudes_are_not_the_weight_norms() -> None:
    adapter = load_adapter(DORA)
    base, _ = load_file(base_dir("llama") / "model.safetensors")
    assert adapter.modules and all(m.magnitude is not None for m in adapter.modules.values())
    for name, m in adapter.modules.items():
        norm = _weight_norm(base[f"{name}.weight"].float() + m.delta())
        rel = ((m.magnitude.float() - norm).abs() / norm).median()
        assert rel > 0.05, f"{name}: magnitude equals ‖W + ΔW‖ (median rel. diff {rel:.2e}): DoRA looks like LoRA"


def test_merge_follows_the_magnitude_like_peft(tmp_path) -> None:  # noqa: ANN001
    """Our merge equals PEFT's merge_and_unload; the same merge without the magnitude is far off."""
    out = tmp_path / "merged"
    merge(base_dir("llama"), [DORA], out)
    ours, _ = load_file(out / "model.safetensors")
    oracle = load_peft(DORA, "llama").merge_and_unload().state_dict()
    base, _ = load_file(base_dir("llama") / "model.safetensors")
    adapter = load_adapter(DORA)
    for name, m in adapter.modules.items():
        key = f"{name}.weight"
        torch.testing.assert_close(ours[key].float(), oracle[key].float(), rtol=1e-5, atol=1e-6)
        as_lora = base[key].float() + m.delta()  # what code that ignores the magnitude writes
        assert (as_lora - oracle[key].float()).abs().max() > 100 * 1e-5, f"{name}: magnitude makes no difference"
