"""--json keeps its promise when a command fails: one JSON object on stdout (issue 19.4).

docs/json.md: "print exactly one JSON object on stdout". A failing command prints an error object
(``ok: false``, ``error: {type, message, hint, exit_code}``), validate its report; the one-line
``Error:`` still goes to stderr. Checked for every command of the CLI, for a domain error and for a
usage error, through the real entry point and its error boundary.
"""

from __future__ import annotations

import json

import pytest
from foundation_support import adapter_dir, base_dir
from models import run_cli

from loratools.cli.main import COMMANDS


def _one_object(stdout: str) -> dict:
    """stdout is exactly one JSON object (json.loads refuses trailing data: a second object fails)."""
    data = json.loads(stdout)
    assert isinstance(data, dict)
    return data


def _domain_error(command: str, tmp) -> list:  # noqa: ANN001
    """Arguments that make ``command`` fail on its input (an empty folder where a model or adapter goes)."""
    empty = tmp / "empty"
    empty.mkdir()
    lora, llama, out = adapter_dir("llama-lora"), base_dir("llama"), tmp / "out"
    return {
        "info": [empty],
        "merge": [empty, lora, "-o", out],
        "verify": [empty, "--base", llama, "--adapter", lora],
        "validate": [empty],
        "resize": [empty, "--rank", "2", "-o", out],
        "rescale": [empty, "--scale", "2", "-o", out],
        "diff": [empty, lora],
        "combine": [empty, lora, "-o", out],
        "extract": [empty, llama, "--rank", "2", "-o", out],
        "spectrum": [empty],
        "push": [empty, "someone/repo", "--dry-run"],
        "convert": [empty, "--to", "kohya", "-o", tmp / "out.safetensors"],
        "export-onnx": [empty, "-o", out],
        "bench": [empty],
    }[command]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_error_is_one_json_object(command: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stdout, stderr = run_cli([command, *_domain_error(command, tmp_path), "--json"])
    assert code == 2, (stdout, stderr)
    data = _one_object(stdout)
    assert data["schema_version"] == 1 and "Traceback" not in stderr
    if command == "validate":  # validate's one object is its report, also for unreadable input
        assert data["usable"] is False and data["ok"] is False
        assert data["findings"][0]["code"] == "unreadable"
        return
    assert data["command"] == command and data["ok"] is False
    error = data["error"]
    assert error["exit_code"] == 2
    assert error["type"] in ("FormatError", "UsageError")
    assert "empty" in error["message"]
    assert f"Error: {error['message']}" in stderr  # the same words as the human line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_usage_error_is_one_json_object(command: str) -> None:
    """A missing argument (click's usage error) is an error object too; click's message stays on stderr."""
    code, stdout, stderr = run_cli([command, "--json"])
    assert code == 2, (stdout, stderr)
    error = _one_object(stdout)["error"]
    assert error["type"] == "UsageError" and error["exit_code"] == 2
    assert error["message"].startswith("Missing argument")
    assert "Missing argument" in stderr


def test_bad_option_value_and_unknown_command() -> None:
    code, stdout, _ = run_cli(["resize", adapter_dir("llama-lora"), "--rank", "nan", "-o", "x", "--json"])
    assert code == 2 and _one_object(stdout)["error"]["type"] == "UsageError"
    code, stdout, _ = run_cli(["nosuch", "--json"])
    assert code == 2 and _one_object(stdout)["command"] == "nosuch"


def test_no_json_object_without_json_and_after_a_result(tmp_path) -> None:
    """Without --json stdout stays empty on error; `--json` after `--` is an argument, not the flag."""
    code, stdout, stderr = run_cli(["info", tmp_path / "missing"])
    assert code == 2 and stdout == "" and stderr.startswith("Error: ")
    code, stdout, _ = run_cli(["info", "--", "--json"])
    assert code == 2 and stdout == ""


def test_failed_verify_prints_only_its_report(tmp_path) -> None:
    """verify prints its report and exits 1: that report is the one object (no error object after it)."""
    merged = tmp_path / "merged"
    assert run_cli(["merge", base_dir("llama"), adapter_dir("llama-lora"), "-o", merged])[0] == 0
    code, stdout, _ = run_cli(
        ["verify", merged, "--base", base_dir("llama"), "--adapter", adapter_dir("llama-rslora"), "--json"]
    )
    assert code == 1
    data = _one_object(stdout)
    assert "error" not in data and data["verified"] is False


def test_output_refusal_is_an_error_object(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, stdout, _ = run_cli(["rescale", adapter_dir("llama-lora"), "--scale", "2", "-o", out, "--json"])
    assert code == 2
    error = _one_object(stdout)["error"]
    assert error["type"] == "OutputExistsError" and error["path"] == str(out) and error["hint"]
