"""Options users expect (issue 15): -q/--progress after the command, --json on rescale/combine,
verify --include/--exclude, --base/--kohya-prefix on the writing verbs, refused options (combine)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from foundation_support import adapter_dir, base_dir

from loratools.cli.main import cli

LORA, RSLORA, GPT2 = adapter_dir("llama-lora"), adapter_dir("llama-rslora"), adapter_dir("gpt2-lora")


def run(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)


def test_quiet_after_the_command(tmp_path) -> None:
    r = run("info", LORA, "-q")
    assert (r.exit_code, r.output) == (0, "")
    r = run("resize", LORA, "--rank", 2, "-o", tmp_path / "small", "--quiet")
    assert (r.exit_code, r.output) == (0, "")
    assert (tmp_path / "small" / "adapter_config.json").is_file()


@pytest.mark.parametrize("name", ["info", "merge", "resize", "rescale", "combine", "verify", "convert", "diff"])
def test_every_command_help_names_quiet_and_json(name: str) -> None:
    text = run(name, "--help").output
    assert "-q, --quiet" in text and "--json" in text and "--progress [auto|plain|off]" in text


def test_plain_progress_lines_for_logs(tmp_path) -> None:
    """CliRunner's stderr is not a terminal: auto shows nothing, plain (flag or env var) prints lines."""
    args = ("merge", base_dir("llama"), LORA, "-o")
    auto = CliRunner().invoke(cli, [str(a) for a in (*args, tmp_path / "a")])
    assert auto.exit_code == 0 and "merging:" not in auto.stderr
    flag = CliRunner().invoke(cli, [str(a) for a in (*args, tmp_path / "b", "--progress", "plain")])
    lines = [x for x in flag.stderr.splitlines() if x.startswith("merging: ")]
    assert flag.exit_code == 0 and lines[-1] == "merging: 100%" and len(lines) <= 11, flag.stderr
    env = CliRunner().invoke(cli, [str(a) for a in (*args, tmp_path / "c")], env={"LORATOOLS_PROGRESS": "plain"})
    assert env.exit_code == 0 and "merging: 100%" in env.stderr
    off = CliRunner().invoke(
        cli, ["--progress", "off", *[str(a) for a in (*args, tmp_path / "d")]], env={"LORATOOLS_PROGRESS": "plain"}
    )
    assert off.exit_code == 0 and "merging:" not in off.stderr
    bad = CliRunner().invoke(cli, ["info", str(LORA)], env={"LORATOOLS_PROGRESS": "loud"})
    assert bad.exit_code == 2 and "LORATOOLS_PROGRESS='loud' is not one of auto, plain, off" in bad.output


def test_rescale_and_combine_json(tmp_path) -> None:
    r = run("rescale", LORA, "--alpha", 4, "-o", tmp_path / "a4", "--json")
    d = json.loads(r.output)
    assert (d["schema_version"], d["modules"], d["alphas"], d["format"]) == (1, 8, [4.0], "peft")
    r = run("combine", LORA, RSLORA, "--method", "svd", "--rank", 2, "-o", tmp_path / "c", "--json")
    d = json.loads(r.output)
    assert (d["method"], d["modules"], d["ranks"], d["output"]) == ("svd", 8, [2], str(tmp_path / "c"))


def test_verify_include_matches_merge_include(tmp_path) -> None:
    merged = tmp_path / "merged"
    assert run("merge", base_dir("llama"), LORA, "-o", merged, "--include", "self_attn").exit_code == 0
    r = run("verify", merged, "--base", base_dir("llama"), "--adapter", LORA, "--include", "self_attn")
    assert (r.exit_code, r.output) == (0, "verified: 4 modules, 21 tensors match\n")
    r = run("verify", merged, "--base", base_dir("llama"), "--adapter", LORA, "--exclude", "mlp")
    assert r.exit_code == 0
    r = run("verify", merged, "--base", base_dir("llama"), "--adapter", LORA, "--include", "nothing")
    assert r.exit_code == 2
    assert r.output == "Error: no adapter module is left to verify\nHint: check --include / --exclude\n"


@pytest.mark.parametrize("command", ["resize", "rescale", "combine", "extract"])
def test_kohya_prefix_on_every_writing_verb(tmp_path, command: str) -> None:
    out = tmp_path / "k.safetensors"
    args = {
        "resize": ("resize", LORA, "--rank", 2),
        "rescale": ("rescale", LORA, "--scale", 0.5),
        "combine": ("combine", LORA, RSLORA),
        "extract": ("extract", base_dir("llama"), base_dir("llama-tuned"), "--rank", 2),
    }[command]
    bare = run(*args, "--to", "kohya", "-o", out)
    assert bare.exit_code == 2 and "Hint: pass --kohya-prefix" in bare.output
    r = run(*args, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", out)
    assert r.exit_code == 0, r.output
    info = json.loads(run("info", out, "--json").output)
    assert info["format"] == "kohya" and info["num_modules"] >= 1
    # an option the target format does not take is refused, not ignored
    r = run(*args, "--kohya-prefix", "lora_te_", "-o", tmp_path / "p")
    assert r.exit_code == 2
    assert r.output == (
        "Error: the peft format takes no --kohya-prefix option\nHint: drop it: peft takes no such options\n"
    )


def test_rescale_kohya_to_peft_with_base(tmp_path) -> None:
    kohya = tmp_path / "k.safetensors"
    assert run("convert", LORA, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", kohya).exit_code == 0
    r = run("rescale", kohya, "--scale", 2, "--to", "peft", "-o", tmp_path / "p")
    assert r.exit_code == 2 and "Hint: pass --base (the model" in r.output
    r = run("rescale", kohya, "--scale", 2, "--to", "peft", "--base", base_dir("llama"), "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    d = json.loads(run("info", tmp_path / "p", "--json").output)
    want = json.loads(run("info", LORA, "--json").output)["modules"]
    assert {m["name"] for m in d["modules"]} == {m["name"] for m in want}
    r = run("resize", kohya, "--rank", 2, "--to", "peft", "--base", base_dir("llama"), "-o", tmp_path / "r")
    assert r.exit_code == 0, r.output


def test_convert_refusal_names_cli_options(tmp_path) -> None:
    r = run("convert", LORA, "--to", "kohya", "--model", "x.onnx", "-o", tmp_path / "k.safetensors")
    assert r.exit_code == 2
    assert r.output == "Error: the kohya format takes no --model option\nHint: kohya takes --kohya-prefix\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ("--method", "cat", "--rank", "2"),
            "Error: --method cat is the exact sum: its rank is the sum of the input ranks, so it takes no --rank\n"
            "Hint: for a rank-R result use --method svd --rank R\n",
        ),
        (
            ("--method", "linear", "--rank", "2"),
            "Error: --method linear is rank-preserving, so it takes no --rank\n"
            "Hint: for a rank-R result use --method svd --rank R\n",
        ),
        (
            ("--method", "svd", "--density", "0.5"),
            "Error: --method svd keeps every entry, so it takes no --density\n"
            "Hint: --density is for --method ties, dare_linear or dare_ties\n",
        ),
        (
            ("--density", "0.5"),
            "Error: --method cat keeps every entry, so it takes no --density\n"
            "Hint: --density is for --method ties, dare_linear or dare_ties\n",
        ),
    ],
)
def test_combine_refuses_options_its_method_ignores(tmp_path, extra: tuple[str, ...], message: str) -> None:
    r = run("combine", LORA, RSLORA, *extra, "-o", tmp_path / "c")
    assert (r.exit_code, r.output) == (2, message)
    assert not (tmp_path / "c").exists()


def test_combine_refuses_adapters_for_different_bases(tmp_path) -> None:
    r = run("combine", LORA, GPT2, "-o", tmp_path / "c")
    assert r.exit_code == 2
    assert r.output == (
        f"Error: the adapters were trained on different base models: {LORA} is for fixtures/bases/llama; "
        f"{GPT2} is for fixtures/bases/gpt2 (model_type llama vs gpt2)\n"
        "Hint: combine adapters of one base model; if both fit one model, pass --base MODEL "
        "(each is checked against it) or --allow-other-base\n"
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["rescale", "resize", "extract"])
def test_writing_verbs_write_gguf_for_the_base_they_are_given(tmp_path, command: str) -> None:
    """--base names the GGUF model a --to gguf output is for (it was accepted and then not used)."""
    import torch

    from loratools import load_adapter

    gguf_model = base_dir("llama").parent.parent / "gguf" / "llama-f32.gguf"
    out = tmp_path / "a.gguf"
    args = {
        "rescale": ("rescale", LORA, "--scale", 0.5, "--base", gguf_model),
        "resize": ("resize", LORA, "--rank", 4, "--base", gguf_model),  # rank 4 = full rank: ΔW kept
        "extract": ("extract", base_dir("llama"), tmp_path / "merged", "--rank", 4),
    }[command]
    if command == "extract":
        assert run("merge", base_dir("llama"), LORA, "-o", tmp_path / "merged").exit_code == 0
    r = run(*args, "--to", "gguf", "-o", out)
    assert r.exit_code == 0, r.output
    back = load_adapter(out, base=gguf_model)
    ref = load_adapter(LORA)
    factor = 0.5 if command == "rescale" else 1.0
    for name, m in ref.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), factor * m.delta(), rtol=1e-4, atol=1e-5)
