"""Hostile file-system shapes (probe4, the stranger round): a base's or an adapter's file that is a dangling
link, a symlink loop or a folder. Each must be refused in one line naming that file, never read as absent."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hostile import BASE_COMMANDS, HostileCase
from reliability_support import FIXTURES, LLAMA_BASE

SHARDED = FIXTURES / "bases" / "llama-sharded"


def _base(name: str, shape: str) -> Callable[[Path], Path]:
    """fixtures/bases/llama with ``name`` replaced by a dangling link, a link to itself or a folder."""

    def build(folder: Path) -> Path:
        out = folder / f"llama-{shape}"
        shutil.copytree(LLAMA_BASE, out)
        target = out / name
        target.unlink()
        if shape == "dangling":
            os.symlink("nowhere/" + name, target)
        elif shape == "loop":
            os.symlink(name, target)
        else:
            target.mkdir()
        return out

    return build


def _index_moved(folder: Path) -> Path:
    """fixtures/bases/llama-sharded whose index lists layer 0's q_proj in a shard that does not hold it."""
    out = folder / "llama-index-moved"
    shutil.copytree(SHARDED, out)
    path = out / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    key = "model.layers.0.self_attn.q_proj.weight"
    wm[key] = next(f for f in sorted(set(wm.values())) if f != wm[key])
    path.write_text(json.dumps(index))
    return out


FLUX = FIXTURES / "dit" / "flux"


def _pipeline_truncated(folder: Path) -> Path:
    """The tiny Flux pipeline whose transformer weights are cut short: the component was skipped as one without
    weights (a scheduler's), so the LoRA's modules were 'not in the base' (probe4)."""
    out = folder / "flux-pipe-damaged"
    shutil.copytree(FLUX / "pipeline", out)
    weights = next((out / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    return out


def _cases() -> list[HostileCase]:
    c = []
    for shape in ("dangling", "loop", "folder"):
        # the base's config.json: validate/info --base took a broken config.json as no config (merge refused it)
        c.append(HostileCase(f"structure-base-config-{shape}", _base("config.json", shape), ["config.json"],
                             dict(BASE_COMMANDS)))  # fmt: skip
    # read from the shard that holds it (merge, validate and info took the base; transformers cannot load it)
    c.append(HostileCase("structure-index-tensor-in-other-shard", _index_moved,
                         ["model.safetensors.index.json", "model.layers.0.self_attn.q_proj.weight"],
                         dict(BASE_COMMANDS)))  # fmt: skip
    lora = FLUX / "kohya-lora.safetensors"
    flux_base = {"merge": ["merge", "B", lora, "-o", "O"], "validate": ["validate", lora, "--base", "B"]}
    c.append(HostileCase("structure-pipeline-component-truncated", _pipeline_truncated, ["transformer"], flux_base))
    return c


CASES = _cases()
__all__ = ["CASES"]
