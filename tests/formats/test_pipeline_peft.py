"""``convert PEFT_FOLDER --to peft --base PIPELINE`` writes the per-component layout PEFT loads (issue 21 item 5):
one ``OUT/transformer/`` adapter whose target modules are the transformer's own paths, not ``transformer.…``."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


def _flux() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 3, 16, generator=g),
        "pooled_projections": torch.randn(1, 8, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(4, 3),
        "txt_ids": torch.zeros(3, 3),
    }


def test_a_transformer_adapter_converted_against_a_pipeline_loads_in_peft(tmp_path: Path) -> None:
    from models import run_cli

    model = _flux()
    pipe = tmp_path / "pipe"
    model.save_pretrained(str(pipe / "transformer"))
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False)
    trained = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    trained.save_pretrained(str(tmp_path / "lora"))

    code, out, err = run_cli(["convert", tmp_path / "lora", "--to", "peft", "--base", pipe, "-o", tmp_path / "out"])
    assert code == 0, err
    written = tmp_path / "out" / "transformer"
    config = json.loads((written / "adapter_config.json").read_text())
    assert config["target_modules"] and not any(t.startswith("transformer.") for t in config["target_modules"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing/unexpected adapter keys
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(written)).eval()
    with torch.no_grad():
        before, ref, got = (m(**_inputs()).sample for m in (model, trained, loaded))
    assert (ref - before).abs().max() > 1e-3  # the adapter moves the output far beyond the tolerance
    assert (got - ref).abs().max() <= 1e-6
