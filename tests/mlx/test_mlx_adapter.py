"""mlx-lm adapters both ways (issue 22 §2), with mlx-lm's own loader and LoRA layers as the oracle: PEFT (rsLoRA,
rank/alpha patterns, an embedding, DoRA) -> MLX runs in mlx-lm like PEFT; an adapter made by mlx-lm reads, converts
to PEFT and merges exactly; PEFT -> MLX -> PEFT is the identity."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlx_support import ADAPTERS, TOL, mlx_logits, mlx_model, models, mx, peft, torch_logits, tuner

from loratools import load_adapter


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_peft_adapter_converted_to_mlx_runs_in_mlx_lm_like_peft(llama, peft_adapters, tmp_path, name) -> None:
    base, model = llama
    folder, trained = peft_adapters[name]
    code, out, err = models.run_cli(["convert", folder, "--to", "mlx", "-o", tmp_path / "mlx"])
    assert code == 0, err
    ref, before = torch_logits(trained), torch_logits(model)
    assert np.abs(ref - before).max() > 100 * TOL  # the adapter moves the logits far beyond the tolerance
    got = mlx_logits(base, tmp_path / "mlx")
    assert np.abs(got - ref).max() <= TOL
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == ("dora" if name == "dora" else "lora")


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_peft_to_mlx_to_peft_is_the_identity(peft_adapters, tmp_path, name) -> None:
    folder, _ = peft_adapters[name]
    assert models.run_cli(["convert", folder, "--to", "mlx", "-o", tmp_path / "mlx"])[0] == 0
    assert models.run_cli(["convert", tmp_path / "mlx", "--to", "peft", "-o", tmp_path / "back"])[0] == 0
    a, b = load_adapter(folder), load_adapter(tmp_path / "back")
    assert sorted(a.modules) == sorted(b.modules)
    for key, m in a.modules.items():
        n = b.modules[key]
        assert m.kind == n.kind
        assert torch.allclose(m.delta(), n.delta(), atol=1e-6), key
        if m.magnitude is not None:
            assert torch.equal(m.magnitude, n.magnitude)


def _mlx_made_adapter(base: Path, folder: Path, dora: bool = False) -> None:
    """An adapter written the way mlx-lm's trainer writes one: its own LoRA layers, trained (random) lora_b."""
    from mlx.utils import tree_flatten

    model = mlx_model(base)
    model.freeze()
    params = {"rank": 4, "scale": 12.5, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj", "lm_head"]}
    tuner.linear_to_lora_layers(model, 1, params, use_dora=dora)  # the last block only, and the head
    mx.random.seed(3)
    trained = {k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(model.trainable_parameters())
               if k.endswith("lora_b")}  # fmt: skip
    model.load_weights(list(trained.items()), strict=False)
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "dora" if dora else "lora", "num_layers": 1, "lora_parameters": params,
              "model": str(base)}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_an_mlx_lm_adapter_reads_converts_to_peft_and_merges_exactly(llama, tmp_path, dora) -> None:
    base, model = llama
    _mlx_made_adapter(base, tmp_path / "mlx", dora)
    adapter = load_adapter(tmp_path / "mlx")
    assert adapter.format == "mlx" and len(adapter.modules) == 3
    m = adapter.modules["model.layers.1.self_attn.q_proj"]
    assert (m.rank, m.alpha, m.scale) == (4, 50.0, 12.5) and (m.magnitude is not None) == dora
    ref = mlx_logits(base, tmp_path / "mlx")
    assert np.abs(ref - mlx_logits(base)).max() > 100 * TOL

    assert models.run_cli(["convert", tmp_path / "mlx", "--to", "peft", "-o", tmp_path / "peft"])[0] == 0
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
    assert np.abs(torch_logits(loaded) - ref).max() <= TOL

    code, _, err = models.run_cli(["merge", base, tmp_path / "mlx", "-o", tmp_path / "merged", "--verify"])
    assert code == 0, err
    assert np.abs(mlx_logits(tmp_path / "merged") - ref).max() <= TOL


def test_info_shows_the_mlx_layout(llama, tmp_path) -> None:
    base, _ = llama
    _mlx_made_adapter(base, tmp_path / "mlx")
    code, out, err = models.run_cli(["info", tmp_path / "mlx", "--json"])
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "mlx" and len(info["modules"]) == 3, info
    assert {m["rank"] for m in info["modules"]} == {4}


def test_validate_for_ollama_says_its_importer_loses_the_mlx_scale(peft_adapters, tmp_path) -> None:
    folder, _ = peft_adapters["rslora"]
    assert models.run_cli(["convert", folder, "--to", "mlx", "-o", tmp_path / "mlx"])[0] == 0
    code, out, _ = models.run_cli(["validate", tmp_path / "mlx", "--target", "ollama"])
    assert code == 1 and "ollama.mlx_scale" in out and "ignores mlx-lm's lora_parameters.scale" in out
    code, out, _ = models.run_cli(["validate", folder, "--target", "ollama"])
    assert "mlx_scale" not in out
