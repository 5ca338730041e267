"""``loratools push`` through the real huggingface_hub client into the loopback Hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from hub_support import pointed_at, run_cli
from huggingface_hub import ModelCard


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def adapter_copy(local, tmp_path) -> Path:  # noqa: ANN001
    return Path(shutil.copytree(local["adapter"], tmp_path / "adapter"))


def test_push_adapter_arrives_byte_for_byte(hub, tmp_path, adapter_copy) -> None:  # noqa: ANN001
    template = (adapter_copy / "README.md").read_text()
    with pointed_at(hub, tmp_path / "home"):
        code, out, err = run_cli(["push", str(adapter_copy), "me/lora", "--base-model", "org/base", "--json"])
    assert code == 0 and err == "", err  # no progress bars or warnings outside a terminal
    result = json.loads(out)
    repo = hub.repos[("model", "me/lora")]
    remote = repo.commits[repo.branches["main"]]
    assert result["commit_sha"] == repo.branches["main"] and not repo.private
    for name, data in _local_files(adapter_copy).items():
        if name != "README.md":
            assert remote[name] == data, name
    # the weights went through the large-file path, the config as a regular file
    weights = (adapter_copy / "adapter_model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() in hub.lfs
    assert hub.requests("POST", "me/lora.git/info/lfs/objects/batch") and hub.requests("PUT", "/__lfs/")
    assert hashlib.sha256(remote["adapter_config.json"]).hexdigest() not in hub.lfs
    # PEFT's untouched template card (issue 14.4) gives way to the generated one; its front matter is kept
    assert template.count("[More Information Needed]") > 20
    card = ModelCard(remote["README.md"].decode())
    assert card.data.base_model == "org/base" and card.data.library_name == "peft"
    assert {"lora", "loratools", "base_model:adapter:org/base", "transformers"} <= set(card.data.tags)
    assert "base_model:adapter:" not in card.data.tags
    assert "[More Information Needed]" not in card.text and "Model Card for Model ID" not in card.text
    for row in ("| rank | 4 |", "| alpha | 7 |", "| targets | ", "| parameters | ", "PeftModel.from_pretrained"):
        assert row in card.text, row
    assert result["card_source"] == "replaced-template"


def test_a_readme_a_person_wrote_is_kept(tmp_path, adapter_copy) -> None:  # noqa: ANN001
    """An edited template (one field filled) and a README of one's own keep their text; front matter grows."""
    from loratools import push

    template = (adapter_copy / "README.md").read_text()
    edited = template.replace("- **Developed by:** [More Information Needed]", "- **Developed by:** Ada Lovelace")
    assert edited != template
    for text in (edited, "---\nlicense: mit\n---\n# My LoRA\n\nTrained on my cat pictures.\n"):
        (adapter_copy / "README.md").write_text(text)
        result = push(adapter_copy, "me/kept", dry_run=True, base_model="org/base")
        card = ModelCard(result.card)
        assert result.card_source == "merged" and card.text == ModelCard(text).text
        assert card.data.base_model == "org/base" and "loratools" in card.data.tags


def test_overwrite_card_and_base_model_from_config(hub, tmp_path, adapter_copy) -> None:  # noqa: ANN001
    cfg_path = adapter_copy / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "org/base"
    cfg["task_type"] = "CAUSAL_LM"
    cfg_path.write_text(json.dumps(cfg))
    with pointed_at(hub, tmp_path / "home"):
        code, out, err = run_cli(["push", str(adapter_copy), "me/lora2", "--overwrite-card", "--revision", "dev"])
    assert code == 0, err
    repo = hub.repos[("model", "me/lora2")]
    assert set(repo.commits[repo.branches["main"]]) == {".gitattributes"}  # committed to the new branch only
    card = ModelCard(repo.commits[repo.branches["dev"]]["README.md"].decode())
    assert card.data.base_model == "org/base" and card.data.pipeline_tag == "text-generation"
    assert "Model Card for Model ID" not in card.text
    for row in ("| rank | 4 |", "| alpha | 7 |", "| targets | down_proj, q_proj, up_proj, v_proj |"):
        assert row in card.text
    assert 'PeftModel.from_pretrained(base, "me/lora2")' in card.text


def test_push_merged_checkpoint_dry_run_then_pr(hub, home, local, tmp_path) -> None:  # noqa: ANN001
    if importlib.util.find_spec("loratools.ops.merge") is None:
        pytest.skip("loratools.ops.merge is not there yet")
    from loratools.ops.merge import merge

    merged = tmp_path / "merged"
    with pointed_at(hub, home):
        merge("hf://org/base", ["hf://org/adapter"], merged)
        before = len(hub.log)
        code, out, err = run_cli(["push", str(merged), "me/merged", "--dry-run"])
        assert code == 0, err
        assert len(hub.log) == before and ("model", "me/merged") not in hub.repos  # nothing was sent
        assert "model.safetensors" in out and "library_name: transformers" in out and "Dry run:" in out
        args = ["push", str(merged), "me/merged", "--private", "--create-pr", "-m", "merged", "--json"]
        code, out, err = run_cli(args)
    assert code == 0, err
    result = json.loads(out)
    repo = hub.repos[("model", "me/merged")]
    assert repo.private and result["pr_url"].endswith("/me/merged/discussions/1")
    assert set(repo.commits[repo.branches["main"]]) == {".gitattributes"}  # main untouched
    remote = repo.commits[repo.branches["refs/pr/1"]]
    for name, data in _local_files(merged).items():
        assert remote[name] == data, name
    card = ModelCard(remote["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.base_model == "org/base"
    assert {"lora", "loratools"} <= set(card.data.tags)
    assert "## How it was made" in card.text and "`loratools merge`" in card.text
    assert "[org/adapter](https://huggingface.co/org/adapter) at `" in card.text  # the Hub input with its commit


def test_push_without_token_is_one_line(hub, tmp_path, adapter_copy) -> None:  # noqa: ANN001
    with pointed_at(hub, tmp_path / "home", token=None):
        code, out, err = run_cli(["push", str(adapter_copy), "me/nologin"])
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0] == "Error: hf://me/nologin: the Hub answered 401: not logged in, or the token cannot write there"
    assert lines[1].startswith("Hint: run `hf auth login` or set HF_TOKEN")


def test_push_library_dry_run_and_bad_inputs(tmp_path, adapter_copy) -> None:  # noqa: ANN001
    from loratools import push
    from loratools.errors import UsageError

    result = push(adapter_copy, "me/lib", dry_run=True)
    assert [f["path"] for f in result.files] == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    assert result.commit_url is None and "library_name: peft" in result.card
    assert "base_model" not in ModelCard(result.card).data.to_dict()  # PEFT wrote '' and nothing else is known
    with pytest.raises(UsageError, match="not a Hub model id"):
        push(adapter_copy, "me/lib", base_model="/local/path", dry_run=True)
    with pytest.raises(UsageError, match="no namespace"):
        push(adapter_copy, "lib", dry_run=True)


def test_cards_for_pipelines_and_onnx_exports(tmp_path) -> None:  # noqa: ANN001
    import torch
    from safetensors.torch import save_file

    from loratools import push
    from loratools.publishing.publish import provenance, provenance_metadata

    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "X"]}')
    (pipe / "unet" / "config.json").write_text("{}")
    record = provenance("merge", {"weights": [1.0]}, {"base": {"repo_id": "org/sd", "revision": "a" * 40}})
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({"w": torch.ones(2)}, str(weights), provenance_metadata(record))
    result = push(pipe, "me/pipe", dry_run=True)
    card = ModelCard(result.card)
    assert card.data.library_name == "diffusers" and card.data.base_model == "org/sd"
    assert "unet/diffusion_pytorch_model.safetensors" in [f["path"] for f in result.files]
    assert 'DiffusionPipeline.from_pretrained("me/pipe")' in card.text and "`loratools merge`" in card.text

    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"graph")
    (onnx / "model.onnx.data").write_bytes(b"weights")
    card = ModelCard(push(onnx, "me/onnx", dry_run=True, base_model="org/base").card)
    assert card.data.library_name == "onnx" and card.data.base_model == "org/base"
    assert "InferenceSession" in card.text
