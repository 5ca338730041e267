"""Fixtures: a loopback Hub (tests/hub/fakehub.py) that the real huggingface_hub client talks to.

huggingface_hub reads HF_ENDPOINT, HF_HOME and friends into ``huggingface_hub.constants`` when it is first
imported (transformers imports it early), so the fixtures set the environment variables *and* patch those
constants; HfApi, snapshot_download and the download functions themselves are never touched.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakehub import GOOD_TOKEN, FakeHub  # noqa: E402


@contextlib.contextmanager
def pointed_at(
    hub: FakeHub, home: Path, *, token: str | None = GOOD_TOKEN, offline: bool = False
) -> Iterator[pytest.MonkeyPatch]:
    """Point huggingface_hub at ``hub`` with cache/config under ``home``; restore everything afterwards."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        if token is None:
            mp.delenv("HF_TOKEN", raising=False)
        else:
            mp.setenv("HF_TOKEN", token)
        patches = {
            "ENDPOINT": hub.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "HF_HUB_OFFLINE": offline,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
        }
        for name, value in patches.items():
            if hasattr(constants, name):
                mp.setattr(constants, name, value)
        yield mp


@pytest.fixture(scope="session")
def models():  # noqa: ANN201 - the tests/models.py module
    import models as m

    return m


@pytest.fixture(scope="session")
def local(tmp_path_factory: pytest.TempPathFactory, models) -> dict[str, Path]:  # noqa: ANN001
    """A tiny llama base (safetensors) and a PEFT adapter for it, on disk."""
    import torch

    root = tmp_path_factory.mktemp("local")
    model = models.build_model("llama")
    base = models.save_base(model, root / "base")
    torch.save(dict(model.state_dict()), base / "pytorch_model.bin")  # a second format the Hub must not send
    models.make_peft(model, root / "adapter", r=4, lora_alpha=7)
    return {"base": base, "adapter": root / "adapter", "root": root}


def _files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def hub(local: dict[str, Path]) -> Iterator[FakeHub]:
    """The loopback Hub with org/base, org/adapter (plus decoys), a private, a gated and a dataset repo."""
    fake = FakeHub(lifetime=600).start()
    base = _files(local["base"])
    base["flax_model.msgpack"] = b"not needed"
    base["onnx/model.onnx"] = b"not needed either"
    fake.add_repo("org/base", base)
    adapter = _files(local["adapter"])
    adapter["training_args.bin"] = b"decoy"
    adapter["checkpoint-10/adapter_model.safetensors"] = b"decoy"
    fake.add_repo("org/adapter", adapter)
    fake.add_repo("org/nested", _files(local["adapter"], "run1/final/"))
    fake.add_repo("org/private", _files(local["adapter"]), private=True)
    fake.add_repo("org/gated", _files(local["adapter"]), gated=True)
    fake.add_repo("org/data-adapter", _files(local["adapter"]), repo_type="dataset")
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME shared by the tests that reuse a populated cache."""
    return tmp_path_factory.mktemp("hf_home")


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``loratools ARGS`` under CliRunner (the group holds the error boundary): (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from loratools.cli.main import cli

    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.stdout, result.stderr
