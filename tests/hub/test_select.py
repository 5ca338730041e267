"""Which files a command asks the Hub for, decided from a repository listing (pure, no network)."""

from __future__ import annotations

import pytest

from loratools.errors import InputNotFoundError, UnsafeInputError, UsageError
from loratools.publishing.hub_select import check_names, select_files

SHARDED = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "original/consolidated.00.pth",
    "onnx/model.onnx",
    "README.md",
    ".gitattributes",
]

PIPELINE = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
]


def test_sharded_checkpoint_gets_safetensors_and_tokenizer_only() -> None:
    got = select_files(SHARDED, "", "base checkpoint", "hf://o/m")
    assert sorted(got) == sorted(
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "special_tokens_map.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]
    )


def test_bin_only_checkpoint_falls_back_to_bin() -> None:
    names = ["config.json", "pytorch_model.bin", "training_args.bin", "README.md"]
    assert sorted(select_files(names, "", "base checkpoint", "x")) == ["config.json", "pytorch_model.bin"]


def test_pipeline_components_plain_weights_before_variants() -> None:
    got = set(select_files(PIPELINE, "", "base checkpoint", "hf://o/sd"))
    assert got == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",  # only a variant there: take it
    }


def test_adapter_choices() -> None:
    peft = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md", "optimizer.pt"]
    assert select_files(peft, "", "adapter", "x") == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    old = ["adapter_config.json", "adapter_model.bin"]
    assert select_files(old, "", "adapter", "x") == ["adapter_config.json", "adapter_model.bin"]
    diffusers = ["pytorch_lora_weights.safetensors", "image.png", "README.md"]
    assert select_files(diffusers, "", "adapter", "x") == ["pytorch_lora_weights.safetensors", "README.md"]
    kohya = ["style.safetensors", "sample.png"]
    assert select_files(kohya, "", "adapter", "x") == ["style.safetensors"]
    with pytest.raises(UsageError, match="holds 2 weight files") as info:
        select_files(["a.safetensors", "b.safetensors"], "", "adapter", "hf://o/loras")
    assert info.value.hint == "name one, e.g. hf://o/loras/a.safetensors"
    assert select_files(["a.safetensors", "b.safetensors"], "b.safetensors", "adapter", "x") == ["b.safetensors"]
    with pytest.raises(InputNotFoundError, match="has adapter_config.json but no adapter_model"):
        select_files(["adapter_config.json"], "", "adapter", "x")


def test_onnx_export_with_external_data() -> None:
    names = ["model.onnx", "model.onnx_data", "w.bin", "config.json", "model.safetensors", "pytorch_model.bin"]
    got = select_files([*names, "README.md"], "", "ONNX model", "x")
    assert sorted(got) == ["config.json", "model.onnx", "model.onnx_data", "w.bin"]
    assert select_files(["onnx/model.onnx", "onnx/model.onnx_data"], "onnx", "onnx", "x") == [
        "onnx/model.onnx",
        "onnx/model.onnx_data",
    ]


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/passwd", "a//b", "a\\b", "./a", "a/../../b"])
def test_names_that_escape_are_refused(bad: str) -> None:
    with pytest.raises(UnsafeInputError, match="would leave the download folder"):
        check_names(["config.json", bad], "hf://o/m")
