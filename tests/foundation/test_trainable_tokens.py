"""PEFT trainable tokens (trainable_token_indices) merge as PEFT merges them. Oracle: merge_and_unload."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner

from loratools.cli.main import cli

INDICES = [3, 5, 90]


def _peft(root, tied: bool):
    """A tiny Llama (tied or not) with LoRA on q_proj plus trainable tokens; saved; PEFT's merged weights."""
    from models import build_model, save_base
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("llama", tie_word_embeddings=tied)
        save_base(model, root / "base")
        torch.manual_seed(3)
        config = LoraConfig(
            r=2, lora_alpha=3, target_modules=["q_proj"], trainable_token_indices=INDICES, init_lora_weights=False
        )
        peft_model = get_peft_model(model, config)
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                with torch.no_grad():
                    p.add_(torch.randn_like(p))  # new rows far from the old ones
        peft_model.save_pretrained(str(root / "lora"))
        merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_merge_matches_peft_merge_and_unload(tmp_path, tied: bool) -> None:
    from safetensors.torch import load_file

    want = _peft(tmp_path, tied)
    base = load_file(tmp_path / "base" / "model.safetensors")
    emb = "model.embed_tokens.weight"
    change = (want[emb] - base[emb]).abs().amax(dim=1)
    assert torch.nonzero(change > 0.1).flatten().tolist() == INDICES  # the rows PEFT replaced, and only them
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "m" / "model.safetensors")
    for key, value in want.items():
        if key == "lm_head.weight" and tied and key not in got:
            key_got = emb
        else:
            key_got = key
        torch.testing.assert_close(got[key_got], value, rtol=0, atol=1e-6, msg=key)


def test_writers_refuse_rather_than_drop_the_tokens(tmp_path) -> None:
    _peft(tmp_path, False)
    r = CliRunner().invoke(cli, ["resize", str(tmp_path / "lora"), "--rank", "1", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2
    assert r.output == (
        "Error: the adapter trains tokens of model.embed_tokens (trainable_token_indices); loratools merges "
        "them but does not write them to a peft adapter\n"
        "Hint: merge it into its base: loratools merge BASE ADAPTER -o OUT\n"
    )


def test_info_names_the_trained_tokens(tmp_path) -> None:
    import json

    _peft(tmp_path, False)
    d = json.loads(CliRunner().invoke(cli, ["info", str(tmp_path / "lora"), "--json"]).output)
    assert d["trainable_tokens"] == {"model.embed_tokens": INDICES}
    assert d["parameters"] == 2 * 2 * (32 + 32) + len(INDICES) * 32
