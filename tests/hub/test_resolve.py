"""hf:// and ORG/NAME inputs resolved by the real huggingface_hub client against the loopback Hub."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hub_support import pointed_at, run_cli

from loratools.errors import HubError, InputNotFoundError, UnsafeInputError, UsageError

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
BASE_FILES = {"config.json", "generation_config.json", "model.safetensors"}


def test_info_on_hub_adapter_fetches_only_what_it_needs(hub, home, local) -> None:  # noqa: ANN001
    with pointed_at(hub, home):
        code, out, err = run_cli(["info", "hf://org/adapter", "--json"])
    assert code == 0 and err == "", err  # no progress bars outside a terminal
    data = json.loads(out)
    assert data["format"] == "peft" and data["rank"] == 4 and data["alpha"] == 7
    assert hub.downloaded("org/adapter") == ADAPTER_FILES  # no training_args.bin, no checkpoint-10/
    assert data["parameters"] > 0


def test_base_from_hub_gets_one_weight_format(hub, home, local) -> None:  # noqa: ANN001
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.publishing.hub import hub_info_for

    with pointed_at(hub, home):
        with open_checkpoint("hf://org/base") as reader, open_checkpoint(local["base"]) as ref:
            assert sorted(reader.keys()) == sorted(ref.keys())
            k = next(iter(ref.keys()))
            assert reader.get(k).equal(ref.get(k))
        record = hub_info_for("hf://org/base")
    assert hub.downloaded("org/base") == BASE_FILES  # not pytorch_model.bin, flax or onnx/
    assert record["repo_id"] == "org/base" and record["revision"] == hub.repos[("model", "org/base")].branches["main"]


def test_merge_from_hub_base_and_adapter_matches_peft(hub, home, local, models, tmp_path) -> None:  # noqa: ANN001
    if importlib.util.find_spec("loratools.ops.merge") is None:
        pytest.skip("loratools.ops.merge is not there yet")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratools.files.safetensors_file import read_header
    from loratools.ops.merge import merge
    from loratools.publishing.publish import read_provenance

    with pointed_at(hub, home):
        merge("hf://org/base", ["hf://org/adapter"], tmp_path / "merged")
    inputs = models.sample_inputs()
    base = AutoModelForCausalLM.from_pretrained(local["base"]).eval()
    plain = models.outputs(base, inputs)
    oracle = models.outputs(PeftModel.from_pretrained(base, local["adapter"]).eval(), inputs)
    ours = models.outputs(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), inputs)
    assert (oracle - plain).abs().max() > 1e-2  # the adapter matters far more than the tolerance
    torch.testing.assert_close(ours, oracle, atol=1e-5, rtol=1e-4)
    record = read_provenance(read_header(tmp_path / "merged" / "model.safetensors")[1])
    adapters = record["inputs"]["adapters"]
    assert adapters[0]["repo_id"] == "org/adapter" and len(adapters[0]["revision"]) == 40
    assert record["inputs"]["base"]["repo_id"] == "org/base" and len(record["inputs"]["base"]["revision"]) == 40


def test_offline_from_populated_cache(hub, home, local, tmp_path) -> None:  # noqa: ANN001
    with pointed_at(hub, home):  # populate (a no-op when earlier tests did)
        assert run_cli(["info", "hf://org/adapter"])[0] == 0
        assert run_cli(["info", "org/adapter", "--base", "hf://org/base"])[0] == 0
    before = len(hub.log)
    with pointed_at(hub, home, offline=True):
        code, out, err = run_cli(["info", "hf://org/adapter", "--base", "hf://org/base", "--json"])
        assert code == 0, err
        assert json.loads(out)["base_parameters"] > 0
        if importlib.util.find_spec("loratools.cli.merge") is not None:
            code, out, err = run_cli(["merge", "hf://org/base", "hf://org/adapter", "-o", str(tmp_path / "out")])
            assert code == 0, err
            assert (tmp_path / "out" / "model.safetensors").is_file()
    assert len(hub.log) == before  # nothing was asked of the Hub


def test_offline_with_nothing_cached_is_one_line(hub, tmp_path) -> None:  # noqa: ANN001
    with pointed_at(hub, tmp_path / "empty-home", offline=True):
        code, out, err = run_cli(["info", "hf://org/adapter"])
    assert code == 2
    assert err.splitlines()[0] == (
        "Error: hf://org/adapter: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    )
    assert "Traceback" not in err and len(err.splitlines()) == 2


@pytest.mark.parametrize(
    "spec, token, first_line",
    [
        ("hf://org/missing", "hf_loopback_good_token", "Error: hf://org/missing: no such repository on the Hub"),
        ("hf://org/private", None, "Error: hf://org/private: the Hub answered 401: the repository does not exist"),
        ("hf://org/gated", "hf_loopback_good_token", "Error: hf://org/gated: the repository is gated"),
        ("hf://org/adapter", "hf_bad_token", "Error: hf://org/adapter: the Hub rejected the token (401)"),
        ("org/missing", "hf_loopback_good_token", "Error: org/missing: no such local adapter file or folder, and the"),
        ("hf://org/adapter@nope", "hf_loopback_good_token", "Error: hf://org/adapter@nope: the repository has no rev"),
    ],
)
def test_hub_errors_are_one_line(hub, tmp_path, spec, token, first_line) -> None:  # noqa: ANN001
    with pointed_at(hub, tmp_path / "home", token=token):
        code, out, err = run_cli(["info", spec])
    lines = err.splitlines()
    assert code == 2, err
    assert lines[0].startswith(first_line), err
    assert len(lines) == 2 and lines[1].startswith("Hint: ") and "Traceback" not in err


def test_private_repo_with_token_from_env_or_login(hub, tmp_path) -> None:  # noqa: ANN001
    from fakehub import GOOD_TOKEN

    from loratools.formats.adapter_io import load_adapter

    with pointed_at(hub, tmp_path / "env-home"):  # HF_TOKEN
        assert load_adapter("hf://org/private").modules
    login_home = tmp_path / "login-home"
    login_home.mkdir()
    (login_home / "token").write_text(GOOD_TOKEN)  # what `hf auth login` stores
    with pointed_at(hub, login_home, token=None):
        assert load_adapter("hf://org/private").modules


def test_paths_revisions_and_datasets(hub, home) -> None:  # noqa: ANN001
    from loratools.formats.adapter_io import load_adapter
    from loratools.publishing.hub import resolve_input

    repo = hub.repos[("model", "org/adapter")]
    sha = repo.branches["main"]
    repo.branches["feature/x"] = sha
    with pointed_at(hub, home):
        nested = resolve_input("hf://org/nested/run1/final", "adapter")
        assert nested.name == "final" and (nested / "adapter_model.safetensors").is_file()
        assert hub.downloaded("org/nested") == {f"run1/final/{n}" for n in ADAPTER_FILES}
        assert load_adapter(f"hf://org/adapter@{sha}").modules
        assert load_adapter("hf://org/adapter@feature%2Fx").modules
        assert load_adapter("hf://datasets/org/data-adapter").modules
        single = resolve_input("hf://org/adapter/adapter_config.json", "adapter")
        assert single.name == "adapter_config.json" and single.is_file()
        with pytest.raises(InputNotFoundError, match="no file or folder 'nope'"):
            resolve_input("hf://org/adapter/nope", "adapter")
        with pytest.raises(InputNotFoundError, match="no adapter") as info:
            resolve_input("hf://org/nested", "adapter")
        assert info.value.hint == "is it in a subfolder? e.g. hf://org/nested/run1"
        with pytest.raises(UsageError, match="not a valid Hub reference"):
            resolve_input("hf://just-one-part", "adapter")


def test_unsafe_names_in_a_listing_are_refused(hub, tmp_path) -> None:  # noqa: ANN001
    from loratools.publishing.hub import resolve_input

    hub.add_repo("org/evil", {"adapter_config.json": b"{}", "../../escape.safetensors": b"x"})
    with pointed_at(hub, tmp_path / "home"), pytest.raises(UnsafeInputError, match="leave the download folder"):
        resolve_input("hf://org/evil", "adapter")


def test_local_paths_never_touch_the_hub(hub, tmp_path, local) -> None:  # noqa: ANN001
    from loratools.publishing.hub import resolve_input

    before = len(hub.log)
    with pointed_at(hub, tmp_path / "home"):
        assert resolve_input(str(local["adapter"]), "adapter") == Path(local["adapter"])
        (tmp_path / "out").mkdir()
        with pytest.raises(InputNotFoundError, match="no such adapter file or folder"):
            resolve_input(str(tmp_path / "out" / "adapter"), "adapter")
        with pytest.raises(InputNotFoundError):
            resolve_input("missing/adapter.safetensors", "adapter")
    assert len(hub.log) == before


def test_unreachable_hub_is_one_line(tmp_path) -> None:  # noqa: ANN001
    from fakehub import FakeHub

    dead = FakeHub()
    dead.stop()  # its port is closed now
    with pointed_at(dead, tmp_path / "home"):
        code, out, err = run_cli(["info", "hf://org/adapter"])
    assert code == 2 and "the Hub cannot be reached (ConnectError" in err.splitlines()[0], err
    from loratools.publishing.hub import resolve_input

    with pointed_at(dead, tmp_path / "home"):
        with pytest.raises(HubError, match="the Hub cannot be reached"):
            resolve_input("hf://org/adapter", "adapter")
        with pytest.raises(InputNotFoundError, match="no such local adapter file or folder, and the Hub lookup"):
            resolve_input("org/adapter", "adapter")  # a bare name: still a missing input
