"""A LoRA saved from a PEFT-wrapped transformer (``get_peft_model`` + ``get_peft_model_state_dict`` +
``<Pipeline>.save_lora_weights``) names its modules ``transformer.base_model.model.…``: merge and validate resolved
them, but ``convert --to comfyui/kohya`` without a base could not tell the family and refused it as no DiT LoRA."""

from __future__ import annotations

import nextdit_support as S
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loratools.cli.main import cli


def test_peft_infixed_chroma_lora_converts_like_its_clean_names(tmp_path):
    model = S.CHROMA.model(0)
    torch.manual_seed(4)
    lora = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(("attn.to_q", "attn.to_k")):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, mod.in_features)
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4)
    save_file(lora, str(tmp_path / "clean.safetensors"), metadata={"format": "pt"})
    infixed = {k.replace("transformer.", "transformer.base_model.model.", 1): v for k, v in lora.items()}
    save_file(infixed, str(tmp_path / "peft.safetensors"), metadata={"format": "pt"})
    for to in ("comfyui", "kohya"):
        outs = []
        for src in ("clean", "peft"):
            out = tmp_path / f"{src}-{to}.safetensors"
            r = CliRunner().invoke(cli, ["convert", str(tmp_path / f"{src}.safetensors"), "--to", to, "-o", str(out)])
            assert r.exit_code == 0, r.output
            outs.append(load_file(str(out)))
        assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_peft_infixed_sd3_lora_converts_against_a_transformer_folder(tmp_path):
    """With a bare transformer folder as --base, the family comes from the base; the infixed names were checked
    raw against its table (an SD3 LoRA on attn2 was called a Qwen-Image file it could not hold)."""
    import sd3_hunyuan_support as H

    model = H.SD3.model(0)
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    torch.manual_seed(5)
    lora = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attn" in name and name.endswith(("to_q", "to_k", "to_v")):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, mod.in_features)
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4)
    assert any(".attn2." in k for k in lora)
    save_file(lora, str(tmp_path / "clean.safetensors"), metadata={"format": "pt"})
    infixed = {k.replace("transformer.", "transformer.base_model.model.", 1): v for k, v in lora.items()}
    save_file(infixed, str(tmp_path / "peft.safetensors"), metadata={"format": "pt"})
    outs = []
    for src in ("clean", "peft"):
        out = tmp_path / f"{src}-comfyui.safetensors"
        argv = ["convert", str(tmp_path / f"{src}.safetensors"), "--to", "comfyui", "--base", str(folder), "-o"]
        r = CliRunner().invoke(cli, [*argv, str(out)])
        assert r.exit_code == 0, r.output
        outs.append(load_file(str(out)))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any("joint_blocks" in k for k in outs[0])
