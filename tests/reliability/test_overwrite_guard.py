"""``--overwrite`` replaces only a previous loratools output (issue 14.15).

``cd proj && loratools rescale A --scale 2 -o . --overwrite`` deleted the user's files. Now the working
directory, the home folder, their ancestors and the ancestors of inputs are refused outright, and any
other existing folder is replaced only when its provenance proves a loratools run wrote it. The refusal
says what would have been removed. Everything runs through the CLI.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reliability_support import LLAMA_BASE, LLAMA_LORA, assert_one_line_error, invoke, tree_digest


def _user_folder(path: Path) -> Path:
    """A folder of someone's own files, with a foreign safetensors file in it."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "src").mkdir()
    (path / "src" / "train.py").write_text("print('hi')\n")
    shutil.copy(LLAMA_LORA / "adapter_model.safetensors", path / "adapter_model.safetensors")  # not ours: no record
    shutil.copy(LLAMA_LORA / "adapter_config.json", path / "adapter_config.json")
    return path


def _rescale(out: Path | str) -> tuple[int, str, str]:
    return invoke("rescale", LLAMA_LORA, "--scale", "2", "-o", out, "--overwrite")


def test_the_working_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proj = _user_folder(tmp_path / "proj")
    before = tree_digest(proj)
    monkeypatch.chdir(proj)
    for target in (".", str(proj), "src/.."):
        code, out, err = _rescale(target)
        assert_one_line_error(code, out, err, "is the working directory")
        assert "would have removed 4 entries" in err and "notes.txt" in err, err
    assert tree_digest(proj) == before


def test_ancestors_of_the_working_directory_and_home_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _user_folder(tmp_path / "home")
    work = home / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = tree_digest(home)
    code, out, err = _rescale("..")
    assert_one_line_error(code, out, err, "contains the working directory")
    code, out, err = _rescale(home)
    assert_one_line_error(code, out, err, "is the home folder")
    monkeypatch.chdir(tmp_path)
    code, out, err = _rescale(home)
    assert_one_line_error(code, out, err, "is the home folder")
    assert tree_digest(home) == before


def test_a_folder_holding_an_input_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(LLAMA_LORA, models / "lora")
    before = tree_digest(models)
    code, out, err = invoke("rescale", models / "lora", "--scale", "2", "-o", models, "--overwrite")
    assert_one_line_error(code, out, err, "the output would overwrite or sit inside the input")
    assert "--overwrite would have removed 1 entry: lora/" in err
    assert tree_digest(models) == before


def test_a_folder_that_is_not_our_output_is_refused_and_listed(tmp_path: Path) -> None:
    mine = _user_folder(tmp_path / "mine")
    before = tree_digest(mine)
    code, out, err = _rescale(mine)
    assert_one_line_error(code, out, err, f"{mine} is not a previous loratools output")
    assert "adapter_model.safetensors has no loratools provenance" in err
    assert "would have removed 4 entries: adapter_config.json, adapter_model.safetensors, notes.txt, src/" in err
    assert "Hint:" in err and "-o" in err
    assert tree_digest(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_folder_of_our_single_file_outputs_is_not_one_output(tmp_path: Path) -> None:
    """~/models holding kohya files we wrote is still the user's folder: two runs, two records."""
    models = tmp_path / "models"
    models.mkdir()
    a, b = models / "a.safetensors", models / "b.safetensors"
    code, _, err = invoke("convert", LLAMA_LORA, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", a)
    assert code == 0, err
    (models / "notes.txt").write_text("mine")
    code, out, err = _rescale(models)
    assert_one_line_error(code, out, err, "a.safetensors is a single-file output of ours, not part of an output")
    code, _, err = invoke("rescale", a, "--scale", "3", "-o", b)
    assert code == 0, err
    before = tree_digest(models)
    code, out, err = _rescale(models)
    assert_one_line_error(code, out, err, f"{models} is not a previous loratools output")
    assert tree_digest(models) == before


def test_a_repository_is_never_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = invoke("rescale", LLAMA_LORA, "--scale", "2", "-o", out)
    assert code == 0, err
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    code, o, err = _rescale(out)
    assert_one_line_error(code, o, err, "holds a .git folder")
    assert (out / ".git" / "HEAD").exists()


@pytest.mark.parametrize("first", ["rescale", "merge"])
def test_a_previous_output_is_replaced(tmp_path: Path, first: str) -> None:
    out = tmp_path / "out"
    if first == "merge":
        code, _, err = invoke("merge", LLAMA_BASE, LLAMA_LORA, "-o", out, "--max-shard-size", "40KB")
    else:
        code, _, err = invoke("rescale", LLAMA_LORA, "--scale", "0.5", "-o", out)
    assert code == 0, err
    code, _, err = _rescale(out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_copied_base_weights_are_accounted_for(tmp_path: Path) -> None:
    """Pipeline components no adapter touches are copied whole (no record in them): the base's digests
    in the provenance account for such files."""
    from loratools.publishing.output_guard import previous_output_problem

    out = tmp_path / "merged"
    code, _, err = invoke("merge", LLAMA_BASE, LLAMA_LORA, "-o", out)
    assert code == 0, err
    assert previous_output_problem(out) is None
    shutil.copy(LLAMA_BASE / "model.safetensors", out / "copied.safetensors")  # the base's bytes: accounted for
    assert previous_output_problem(out) is None
    other = tmp_path / "other.safetensors"
    code, _, err = invoke("convert", LLAMA_LORA, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", other)
    assert code == 0, err
    shutil.copy(other, out / "other.safetensors")  # another run's record: not this output
    assert "other.safetensors" in (previous_output_problem(out) or "")
