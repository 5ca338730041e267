"""A damaged adapter file is named damaged, not "not a LoRA adapter in any known format": the format sniffers pass
over a file whose header they cannot parse, so detection raises the safetensors reader's own line."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save_file

from loratools import load_adapter
from loratools.errors import FormatError
from loratools.formats.registry import detect_format


def _kohya(path):
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, 32),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(32, 4),
            "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0),
        },
        str(path),
    )
    return path.read_bytes()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda b: b[: len(b) - 40], "lies outside the file"),
        (lambda b: b[:30], "runs past the end"),
        (lambda b: struct.pack("<Q", 2**63) + b[8:], "header claims"),
        (lambda b: b[:8] + b"\xff" * 16 + b[24:], "header is not JSON"),
    ],
    ids=["data-cut", "header-cut", "absurd-length", "header-garbage"],
)
def test_damaged_file_names_the_damage(tmp_path, damage, says):
    good = tmp_path / "lora.safetensors"
    data = _kohya(good)
    assert detect_format(good).name == "kohya"  # the intact file is read: the damage below is what is refused
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(data))
    with pytest.raises(FormatError) as err:
        detect_format(bad)
    assert says in str(err.value) and "bad.safetensors" in str(err.value)
    assert "any known format" not in str(err.value)


def test_damaged_peft_folder_names_the_file(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match="adapter_model.safetensors.*header claims"):
        load_adapter(folder)
