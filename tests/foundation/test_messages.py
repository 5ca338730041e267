"""What info/validate/diff say (issue 15.2, 15.3, 15.5, 15.9 and info of a merged checkpoint): exact output."""

from __future__ import annotations

import json
import warnings

import pytest
from click.testing import CliRunner
from foundation_support import adapter_dir, base_dir

from loratools.cli.main import cli

LORA = adapter_dir("llama-lora")


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A Llama with tie_word_embeddings (no lm_head.weight on disk) and a PEFT LoRA on lm_head + q_proj."""
    from models import build_model, make_peft, save_base

    root = tmp_path_factory.mktemp("tied")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("llama", tie_word_embeddings=True)
        save_base(model, root / "base")
        make_peft(model, root / "lora", target_modules=["lm_head", "q_proj"], r=2, lora_alpha=3)
    return root


def test_tied_head_lora_validates_against_its_base(tied) -> None:
    r = run("validate", tied / "lora", "--base", tied / "base")
    ok = f"{tied / 'lora'} (peft, 3 modules, against {tied / 'base'}): OK, no problems found\n"
    assert (r.exit_code, r.output) == (0, ok)


def test_info_counts_trained_parameters_not_the_saved_base_layer(tied) -> None:
    from loratools.checkpoint.reader import open_checkpoint

    d = json.loads(run("info", tied / "lora", "--base", tied / "base", "--json").output)
    factors = 2 * (32 + 96) + 2 * 2 * (32 + 32)  # lm_head 32->96, two q_proj 32->32, rank 2
    assert d["parameters"] == factors == 512
    assert d["saved_base_layers"] == ["lm_head.weight"] and d["unresolved"] == []
    with open_checkpoint(tied / "base") as reader:
        assert "lm_head.weight" not in reader.keys()
    assert d["parameter_share"] == pytest.approx(512 / d["base_parameters"])
    text = run("info", tied / "lora", "--base", tied / "base").output
    assert "base layers   lm_head.weight (saved copies of the base, not trained)\n" in text
    assert "not in base" not in text and "full tensors" not in text


def test_info_base_that_is_an_adapter(tmp_path) -> None:
    other = adapter_dir("llama-rslora")
    r = run("info", LORA, "--base", other)
    assert r.exit_code == 2
    assert r.output == (
        f"Error: --base {other} is an adapter (peft), not a base model\n"
        f"Hint: pass the model the adapter was trained on: loratools info {LORA} --base MODEL\n"
    )


def test_diff_across_formats_without_base_says_why(tmp_path) -> None:
    kohya = tmp_path / "k.safetensors"
    assert run("convert", LORA, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", kohya).exit_code == 0
    r = run("diff", LORA, kohya)
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {LORA} (peft) and {kohya} (kohya) share no module name: the two formats name modules "
        "differently, so nothing can be compared without the model\n"
        f"Hint: pass the model they are for: loratools diff {LORA} {kohya} --base MODEL\n"
    )
    d = json.loads(run("diff", LORA, kohya, "--base", base_dir("llama"), "--json").output)
    assert len(d["modules"]) == 8 and max(m["relative_difference"] for m in d["modules"]) < 1e-6


def test_info_of_a_merged_checkpoint_shows_what_was_merged(tmp_path) -> None:
    merged = tmp_path / "merged"
    rs = adapter_dir("llama-rslora")
    assert run("merge", base_dir("llama"), LORA, rs, "--weights", "0.5,-1", "-o", merged).exit_code == 0
    r = run("info", merged)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:5] == [
        f"path     {merged}",
        "kind     merged checkpoint (21 tensors)",
        f"base     {base_dir('llama')}",
        f"merged   {LORA} (weight 0.5)",
        f"         {rs} (weight -1)",
    ]
    d = json.loads(run("info", merged, "--json").output)
    assert (d["kind"], d["adapters"], d["weights"]) == ("merged checkpoint", [str(LORA), str(rs)], [0.5, -1.0])
    # a model no loratools merge wrote is still not an adapter
    r = run("info", base_dir("llama"))
    assert r.exit_code == 2 and "looks like a base model, not an adapter" in r.output


def test_targets_are_grouped() -> None:
    from loratools.ops.info import target_names

    assert target_names(["unet.down.0.attn.to_out.0", "unet.up.1.attn.to_out.0", "unet.up.1.attn.to_q"]) == [
        "to_out.0",
        "to_q",
    ]
    kohya = [
        f"lora_unet_{b}_blocks_{i}_attentions_{j}_transformer_blocks_{k}_attn{a}_{t}"
        for b in ("down", "up")
        for i in range(3)
        for j in range(2)
        for k in range(10)
        for a in (1, 2)
        for t in ("to_q", "to_k", "to_v", "to_out_0")
    ]
    assert len(kohya) == 960
    assert target_names(kohya) == sorted(f"attn{a}_{t}" for a in (1, 2) for t in ("to_q", "to_k", "to_v", "to_out_0"))


def test_a_text_file_named_safetensors_is_not_a_safetensors_file(tmp_path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    (folder / "adapter_model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    r = run("info", folder)
    assert r.exit_code == 2
    assert r.output == (
        f"Error: {folder / 'adapter_model.safetensors'}: not a safetensors file (it starts with b'version ', not "
        "an 8-byte header length and a JSON header)\n"
        "Hint: check the path; a text file, HTML page or Git LFS pointer is not the weights\n"
    )


@pytest.mark.parametrize("command", ["resize", "merge"])
def test_an_empty_output_path_is_a_usage_error(command: str) -> None:
    args = ("resize", LORA, "--rank", 2) if command == "resize" else ("merge", base_dir("llama"), LORA)
    r = CliRunner().invoke(cli, [str(a) for a in (*args, "-o", "")])
    assert r.exit_code == 2
    assert r.output.splitlines()[-1] == (
        "Error: Invalid value for '-o' / '--output': an empty path; "
        "give a file or folder name (for example -o out/NAME)"
    )


def test_resize_ratio_nan_is_refused_up_front(tmp_path) -> None:
    r = CliRunner().invoke(cli, ["resize", str(LORA), "--ratio", "nan", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "Invalid value for '--ratio': must be a finite number" in r.output
    assert "dropped" not in r.output and not (tmp_path / "x").exists()


def test_cards_round_alpha_and_count_merged_adapters(tmp_path) -> None:
    third = tmp_path / "third"
    assert run("rescale", LORA, "--alpha", 7 / 3, "-o", third).exit_code == 0
    r = run("push", third, "me/third", "--dry-run")
    assert r.exit_code == 0 and "| alpha | 2.3333 |" in r.output and "2.3333333" not in r.output
    merged = tmp_path / "merged"
    assert run("merge", base_dir("llama"), LORA, adapter_dir("llama-rslora"), "-o", merged).exit_code == 0
    r = run("push", merged, "me/merged", "--dry-run")
    assert r.exit_code == 0 and "with 2 LoRA adapters merged into its weights" in r.output, r.output
