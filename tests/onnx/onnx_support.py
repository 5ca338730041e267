"""Shared tiny models, adapters and ONNX exports for the ONNX tests (exports are slow: made once per session)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import models  # noqa: E402
from models import run_cli  # noqa: E402, F401 - one CLI runner for every test folder

KINDS = ("llama", "gpt2", "bert")


class Tiny:
    """One tiny model kind: base folder, two PEFT adapters (r=4 all default targets, r=6 a subset)."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.model = models.build_model(kind)
        self.base = models.save_base(self.model, root / "base")
        self.peft = models.make_peft(self.model, root / "adapter", kind=kind, r=4, lora_alpha=7)
        second = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query"]}[kind]
        self.peft2 = models.make_peft(
            self.model, root / "adapter2", kind=kind, r=6, lora_alpha=3, target_modules=second, seed=5
        )
        self.adapter, self.adapter2 = root / "adapter", root / "adapter2"
        self._exports: dict[str, Path] = {}

    def feed(self, batch: int = 2, seq: int = 7) -> dict:
        inputs = models.sample_inputs(batch, seq)
        if self.kind == "bert":
            import torch

            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        return inputs

    def export(self, name: str, **kw) -> Path:
        """``export_onnx`` into ROOT/name once per session."""
        if name not in self._exports:
            from loratools.onnx.export import export_onnx

            export_onnx(self.base, self.root / f"onnx-{name}", **kw)
            self._exports[name] = self.root / f"onnx-{name}"
        return self._exports[name]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(kind) -> Tiny, built once per kind."""
    cache: dict[str, Tiny] = {}

    def get(kind: str) -> Tiny:
        if kind not in cache:
            cache[kind] = Tiny(kind, tmp_path_factory.mktemp(f"onnx-{kind}"))
        return cache[kind]

    return get


def run(model_dir, feed, adapter_file=None):
    """onnxruntime output 0 for a torch-tensor feed (names the graph does not take are dropped)."""
    from loratools.onnx.runtime import run_with_adapter, session

    sess = session(model_dir)
    names = {i.name for i in sess.get_inputs()}
    np_feed = {k: v.numpy() for k, v in feed.items() if k in names}
    return run_with_adapter(sess, np_feed, adapter_file)[0]
