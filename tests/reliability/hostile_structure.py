"""Hostile file-system shapes (probe4, the stranger round): a base's or an adapter's file that is a dangling
link, a symlink loop or a folder. Each must be refused in one line naming that file, never read as absent."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hostile import BASE_COMMANDS, HostileCase
from reliability_support import LLAMA_BASE


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


def _cases() -> list[HostileCase]:
    c = []
    for shape in ("dangling", "loop", "folder"):
        # the base's config.json: validate/info --base took a broken config.json as no config (merge refused it)
        c.append(HostileCase(f"structure-base-config-{shape}", _base("config.json", shape), ["config.json"],
                             dict(BASE_COMMANDS)))  # fmt: skip
    return c


CASES = _cases()
__all__ = ["CASES"]
