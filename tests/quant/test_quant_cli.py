"""The quantized-base options of ``loratools merge`` / ``validate`` / ``info`` as a user runs them."""

from __future__ import annotations

import json

from click.testing import CliRunner

from loratools.cli.main import cli


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output


def test_merge_requantize_json_and_human(tmp_path, bnb_bases, base16) -> None:  # noqa: ANN001
    from quant_support import ALL_LINEAR, models

    adapter = tmp_path / "ad"
    models.make_peft(
        models.build_model("llama", hidden_size=64, intermediate_size=96), adapter, target_modules=ALL_LINEAR
    )
    code, out = _run("merge", bnb_bases["fp4"], adapter, "-o", tmp_path / "q", "--requantize", "--json")
    assert code == 0, out
    data = json.loads(out)
    q = data["quantized_base"]
    assert q["scheme"] == "bnb-4bit" and q["output"] == "requantized" and len(q["modules"]) == 14
    assert all(m["rho"] is not None for m in q["modules"])
    code, out = _run("merge", bnb_bases["fp4"], adapter, "-o", tmp_path / "r", "--reference", base16)
    assert code == 0, out
    assert "quantized base: bnb-4bit (fp4, blocksize 64)" in out and "median gap" in out and "Recommendation:" in out
    code, out = _run("merge", bnb_bases["fp4"], adapter, "-o", tmp_path / "s", "--into", "reference")
    assert code == 2 and "--into reference needs --reference" in out


def test_validate_quantized_base_with_reference(tmp_path, bnb_bases, base16) -> None:  # noqa: ANN001
    """A QLoRA-sized update on an nf4 base: the 16-bit base is far from deq(Wq), and validate says so."""
    import torch
    from quant_support import ALL_LINEAR, models

    peft = models.make_peft(
        models.build_model("llama", hidden_size=64, intermediate_size=96), None, target_modules=ALL_LINEAR
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(1e-3)
    peft.save_pretrained(str(tmp_path / "ad"))
    code, out = _run("validate", tmp_path / "ad", "--base", bnb_bases["nf4-dq"], "--reference", base16, "--json")
    assert code == 0, out  # a warning, not an error
    data = json.loads(out)
    q = data["quantized_base"]
    assert q["quantization"]["settings"]["blocksize"] == 64 and len(q["quantized"]) == 14
    assert q["median_gap"] > 1 and "merge into the quantized base" in q["recommendation"]
    assert [f["code"] for f in data["findings"]] == ["reference_far_from_trained_base"]
    code, out = _run("validate", tmp_path / "ad", "--base", bnb_bases["int8"])
    assert code == 0 and "quantized base: bnb-8bit" in out
    code, out = _run("validate", tmp_path / "ad", "--reference", base16)
    assert code == 2 and "--reference needs --base" in out


def test_info_shows_the_base_quantization() -> None:
    code, out = _run("info", "fixtures/peft/llama-lora", "--base", "fixtures/bases/llama-bnb-nf4", "--json")
    assert code == 0, out
    q = json.loads(out)["base_quantization"]
    assert q["scheme"] == "bnb-4bit" and q["bits"] == 4 and q["settings"]["blocksize"] == 64
    assert "model.layers.0.self_attn.q_proj.weight" in q["quantized"] and "lm_head.weight" not in q["quantized"]
    code, out = _run("info", "fixtures/peft/llama-lora", "--base", "fixtures/bases/llama-bnb-nf4")
    assert "base quantized  bnb-4bit (nf4, blocksize 64, double quant)" in out
