"""Issue 22 §1.5: what a merge into a GGUF base cannot take is refused with a way out that is not the merge
just run (no llama.cpp runtime needed)."""

from __future__ import annotations

import pytest
import torch
from hf_to_gguf import convert
from tiny_models import build

from loratools.errors import UnsupportedError
from loratools.model.adapter import Adapter, LoraModule


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    work = tmp_path_factory.mktemp("hints")
    folder, _ = build("llama", work / "base")
    return convert(folder, work / "base.gguf")


def _lora(seed: int, **extra) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g), alpha=2, **extra)


@pytest.mark.parametrize("what", ["full_tensor", "dora", "bias"])
def test_merge_hint_is_not_the_merge(base, what, tmp_path):
    from loratools.ops.merge.gguf import merge_gguf

    q = "model.layers.0.self_attn.q_proj"
    if what == "full_tensor":
        adapter = Adapter({q: _lora(0)}, replacements={"model.norm.weight": torch.full((64,), 2.0)})
    elif what == "dora":
        adapter = Adapter({q: _lora(0, magnitude=torch.ones(64))})
    else:
        adapter = Adapter({q: _lora(0, bias=torch.ones(64))})
    with pytest.raises(UnsupportedError) as exc:
        merge_gguf(base, [adapter], tmp_path / "m.gguf")
    assert "loratools merge BASE" not in (exc.value.hint or "") and "HF_FOLDER" in (exc.value.hint or "")
    assert not (tmp_path / "m.gguf").exists()
