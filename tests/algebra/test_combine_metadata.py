"""A combined adapter is a new artefact: its metadata names its sources and keeps only what stays true of
it (no training facts of input A); ``ss_network_args`` conv_dim/conv_alpha describe the output after
combine, resize and rescale, and go when the output has no conv module."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from loratools import combine, load_adapter, rescale, resize
from loratools.files.safetensors_file import read_header

LINEAR = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def _kohya(path, seed: int, title: str, *, conv: bool = True, conv_rank: int = 4, conv_alpha: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        f"{LINEAR}.lora_down.weight": torch.randn(4, 12, generator=g),
        f"{LINEAR}.lora_up.weight": torch.randn(10, 4, generator=g),
        f"{LINEAR}.alpha": torch.tensor(3.0),
    }
    if conv:
        sd[f"{CONV}.lora_down.weight"] = torch.randn(conv_rank, 6, 3, 3, generator=g)
        sd[f"{CONV}.lora_up.weight"] = torch.randn(8, conv_rank, 1, 1, generator=g)
        sd[f"{CONV}.alpha"] = torch.tensor(conv_alpha)
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha), "dropout": "0.1"} if conv else {}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "3.0",
        "ss_network_args": json.dumps(args),
        "ss_output_name": title,
        "ss_training_comment": f"trained {title} on my cat",
        "ss_tag_frequency": json.dumps({"cat": {"cat": 12}}),
        "ss_learning_rate": str(1e-4 * seed),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": "v1-5-pruned.safetensors",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.description": f"{title}, my style",
        "modelspec.date": "2024-01-0" + str(seed),
    }
    save_file(sd, str(path), metadata=meta)
    return path


def _meta(path) -> dict[str, str]:
    return read_header(path)[1]


def test_combine_writes_fresh_metadata_naming_its_sources(tmp_path) -> None:
    a = _kohya(tmp_path / "a.safetensors", 1, "catstyle")
    b = _kohya(tmp_path / "b.safetensors", 2, "dogstyle", conv_rank=2, conv_alpha=1.0)
    out = tmp_path / "ab.safetensors"
    combine([a, b], weights=[0.7, 0.3], output=out)
    meta = _meta(out)
    for stale in (
        "ss_output_name",
        "ss_training_comment",
        "ss_tag_frequency",
        "ss_learning_rate",
        "modelspec.description",
    ):
        assert stale not in meta, (stale, meta.get(stale))
    assert meta["modelspec.title"] != "catstyle" and "catstyle" in meta["modelspec.title"]
    assert meta["modelspec.merged_from"] == "catstyle, dogstyle"
    assert meta["modelspec.date"] != "2024-01-01"
    for shared in ("modelspec.architecture", "modelspec.implementation", "ss_base_model_version", "ss_sd_model_name"):
        assert meta[shared] == _meta(a)[shared]
    # cat: the conv module has rank 4 + 2 and scale 1 (alpha = rank); the args say so, dropout stays (same in both)
    conv = load_adapter(out).modules[CONV]
    assert conv.rank == 6 and conv.alpha == 6
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "6", "conv_alpha": "6", "dropout": "0.1"}


def test_resize_and_rescale_rewrite_conv_network_args(tmp_path) -> None:
    a = _kohya(tmp_path / "a.safetensors", 1, "catstyle")  # conv rank 4, alpha 2: scale 0.5
    resize(a, rank=2, output=tmp_path / "r.safetensors")
    meta = _meta(tmp_path / "r.safetensors")
    conv = load_adapter(tmp_path / "r.safetensors").modules[CONV]
    assert conv.rank == 2 and conv.alpha == 1.0
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1", "dropout": "0.1"}
    assert meta["ss_output_name"] == "catstyle"  # still that training's adapter, resized

    rescale(a, scale=2.0, output=tmp_path / "s.safetensors")
    args = json.loads(_meta(tmp_path / "s.safetensors")["ss_network_args"])
    conv = load_adapter(tmp_path / "s.safetensors").modules[CONV]
    assert args["conv_dim"] == "4" and float(args["conv_alpha"]) == conv.alpha == 4.0


def test_combine_of_inputs_without_conv_drops_conv_args(tmp_path) -> None:
    a = _kohya(tmp_path / "a.safetensors", 1, "catstyle")
    b = _kohya(tmp_path / "b.safetensors", 2, "dogstyle")
    ad = load_adapter(a).select(exclude="conv1")
    out = tmp_path / "lin.safetensors"
    combine([ad, load_adapter(b).select(exclude="conv1")], output=out)
    args = json.loads(_meta(out).get("ss_network_args", "{}"))
    assert "conv_dim" not in args and "conv_alpha" not in args


def test_peft_combine_keeps_only_shared_config(tmp_path) -> None:
    import models

    llama = models.build_model("llama")
    models.make_peft(llama, tmp_path / "a", r=4, lora_alpha=7, lora_dropout=0.1, task_type="CAUSAL_LM")
    models.make_peft(llama, tmp_path / "b", r=2, lora_alpha=3, lora_dropout=0.05, task_type="CAUSAL_LM", seed=2)
    combine([tmp_path / "a", tmp_path / "b"], output=tmp_path / "ab")
    cfg = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["lora_dropout"] == 0.0  # the inputs disagree: A's is not the result's
