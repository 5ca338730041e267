"""The hostile-input generator's frame: a case builds one broken file (or folder) in a temporary folder and
names what the one error line must say; ``test_hostile`` runs every command a case lists on it.

Each reader area has its own generator module (``hostile_<area>.py``) exposing ``CASES``; add a module to
``AREAS`` below. A case is data, built fresh in the test's own temporary folder (nothing is committed, nothing
is left behind). What every command must do with it: exit 2 (or 1 for ``validate``'s findings), one
``Error:`` line (or one finding) naming the file and the field (``expect``: substrings it must hold), no
traceback, no "internal error", nothing written to the output.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reliability_support import FIXTURES, LLAMA_BASE, LLAMA_LORA

#: the generator modules, one per reader area
AREAS = (
    "hostile_gguf", "hostile_quant", "hostile_quant_schemes", "hostile_families", "hostile_files", "hostile_mlx",
    "hostile_moe", "hostile_comfy_fp8", "hostile_gguf_dit", "hostile_nextdit", "hostile_cogvideox",
    "hostile_structure",
)  # fmt: skip

#: argv templates: A = the hostile adapter, B = the hostile base, O = the output path
ADAPTER_COMMANDS = {
    "info": ["info", "A"],
    "validate": ["validate", "A"],
    "validate-base": ["validate", "A", "--base", LLAMA_BASE],
    "convert": ["convert", "A", "--to", "peft", "-o", "O"],
    "merge": ["merge", LLAMA_BASE, "A", "-o", "O"],
}
BASE_COMMANDS = {
    "merge": ["merge", "B", LLAMA_LORA, "-o", "O"],
    "validate": ["validate", LLAMA_LORA, "--base", "B"],
    "info": ["info", LLAMA_LORA, "--base", "B"],
}


@dataclass(frozen=True)
class HostileCase:
    """One hostile input: ``build(folder) -> path`` writes it; every command in ``commands`` must refuse it."""

    name: str  # area-class-variant, unique over all areas
    build: Callable[[Path], Path]
    expect: Sequence[str]  # substrings of the one error line (the field / tensor; the file name is checked always)
    commands: dict[str, list] = field(default_factory=lambda: dict(ADAPTER_COMMANDS))
    validate_exit: int = 2  # 1 where validate reports the problem as a finding instead of refusing to read
    name_in_error: bool = True  # the error line names the input file or folder


def all_cases() -> list[HostileCase]:
    cases: list[HostileCase] = []
    for area in AREAS:
        try:
            module = importlib.import_module(area)
        except ModuleNotFoundError as exc:
            if exc.name != area:
                raise
            continue
        cases += module.CASES
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "hostile case names must be unique"
    return cases


__all__ = ["ADAPTER_COMMANDS", "BASE_COMMANDS", "FIXTURES", "HostileCase", "all_cases"]
