"""Activated LoRA (aLoRA): shown by info, flagged by validate, refused by merge without --allow-alora,
carried by convert to PEFT (PEFT's own aLoRA runtime gives the same outputs) and refused where a format
cannot hold the invocation tokens. Fixture: fixtures/peft/llama-alora, made by PEFT 0.21."""

from __future__ import annotations

import json
import shutil
import warnings

import models
import pytest
import torch
from click.testing import CliRunner
from foundation_support import adapter_dir, base_dir, load_base

from loratools import combine, convert, info, load_adapter, merge, validate
from loratools.cli.main import cli
from loratools.errors import UnsupportedError

ALORA = adapter_dir("llama-alora")
TOKENS = [17, 42, 5]
#: the invocation tokens sit at positions 2..4: before them aLoRA leaves the base's outputs alone
IDS = torch.tensor([[3, 9, 17, 42, 5, 8, 11, 2]])


def _peft(folder):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load_base("llama"), str(folder)).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def oracle() -> torch.Tensor:
    out, base = _logits(_peft(ALORA)), _logits(load_base("llama"))
    diff = (out - base).abs().amax(-1)[0]
    assert float(diff[:2].max()) == 0 and float(diff[2:].min()) > 1e-2  # it really is activated at position 2
    return out


def test_info_shows_alora() -> None:
    d = info(ALORA)
    assert d["alora_invocation_tokens"] == TOKENS
    r = CliRunner().invoke(cli, ["info", str(ALORA)], catch_exceptions=False)
    assert r.exit_code == 0 and "aLoRA" in r.output and "plain LoRA" not in r.output


def test_validate_flags_alora() -> None:
    report = validate(ALORA)
    found = [f for f in report.findings if f.code == "alora"]
    assert found and found[0].severity == "warning" and "--allow-alora" in (found[0].hint or "")


def test_merge_refuses_without_opt_in_and_bakes_it_in_with_it(tmp_path) -> None:
    with pytest.raises(UnsupportedError, match="aLoRA") as exc:
        merge(base_dir("llama"), [ALORA], tmp_path / "m")
    assert "--allow-alora" in (exc.value.hint or "")
    assert not (tmp_path / "m").exists()
    r = CliRunner().invoke(cli, ["merge", str(base_dir("llama")), str(ALORA), "-o", str(tmp_path / "m")])
    assert r.exit_code != 0 and "--allow-alora" in r.output
    # opted in: the merged model is the adapter applied to every token (PEFT with aLoRA switched off)
    r = CliRunner().invoke(
        cli, ["merge", str(base_dir("llama")), str(ALORA), "-o", str(tmp_path / "m"), "--allow-alora"]
    )
    assert r.exit_code == 0, r.output
    plain = tmp_path / "plain"
    shutil.copytree(ALORA, plain)
    cfg = json.loads((plain / "adapter_config.json").read_text())
    cfg["alora_invocation_tokens"] = None
    (plain / "adapter_config.json").write_text(json.dumps(cfg))
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(_logits(merged), _logits(_peft(plain)), rtol=1e-5, atol=1e-5)


def test_convert_to_peft_keeps_alora(tmp_path, oracle) -> None:
    convert(ALORA, "peft", tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["alora_invocation_tokens"] == TOKENS
    torch.testing.assert_close(_logits(_peft(tmp_path / "c")), oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_formats_without_invocation_tokens_refuse(tmp_path, fmt) -> None:
    with pytest.raises(UnsupportedError, match="invocation tokens"):
        opts = {"kohya_prefix": "lora_llm_"} if fmt == "kohya" else {}
        convert(ALORA, fmt, tmp_path / ("k.safetensors" if fmt == "kohya" else "d"), **opts)


def test_combine_refuses_mixing_alora_and_plain(tmp_path) -> None:
    with pytest.raises(UnsupportedError, match="aLoRA"):
        combine([ALORA, adapter_dir("llama-lora")])
    out = combine([ALORA, ALORA], weights=[0.5, 0.5])
    assert load_adapter(ALORA).meta["alora_invocation_tokens"] == out.meta.get("alora_invocation_tokens") == TOKENS


def test_the_fixture_is_a_real_peft_alora() -> None:
    assert models.VOCAB > max(TOKENS)
