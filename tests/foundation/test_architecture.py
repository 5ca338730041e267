"""The layers' import rules (docs/architecture.md), checked on every import in loratools/, also those inside
functions: a forbidden arrow fails with the file, the line and the rule it breaks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "loratools"

#: (who, may not import, except these targets, why) — prefixes of dotted module names
RULES = [
    ("loratools.errors", ("loratools.",), (), "errors is the bottom: everything may raise them"),
    ("loratools.files", ("loratools.",), ("loratools.errors", "loratools.files"), "checked readers, no policy"),
    ("loratools.args", ("loratools.",), ("loratools.errors", "loratools.args"), "argument checks, no policy"),
    (
        "loratools.model",
        ("loratools.formats", "loratools.ops", "loratools.onnx", "loratools.cli", "loratools.checkpoint"),
        ("loratools.checkpoint.keymap",),
        "the canonical model knows no file format, reader or operation (name matching aside)",
    ),
    (
        "loratools.families",
        ("loratools.formats", "loratools.ops", "loratools.onnx", "loratools.cli", "loratools.checkpoint"),
        (),
        "a family is math over its factors",
    ),
    (
        "loratools.formats",
        ("loratools.ops", "loratools.cli", "loratools.checkpoint"),
        ("loratools.checkpoint.keymap", "loratools.checkpoint.ldm_keymap"),
        "formats see a base only through the KeyResolver protocol (name tables aside)",
    ),
    ("loratools.checkpoint", ("loratools.formats", "loratools.ops", "loratools.onnx", "loratools.cli"), (), "readers"),
    ("loratools.ops", ("loratools.cli",), (), "operations are the library; the CLI renders them"),
    ("loratools.onnx", ("loratools.cli",), (), "the ONNX layer is library code"),
    (
        "loratools.publishing",
        ("loratools.ops", "loratools.onnx", "loratools.cli", "loratools.formats", "loratools.checkpoint"),
        (),
        "atomic outputs, provenance and hf:// paths sit below every writer",
    ),
]
#: modules that sit above their folder's rule, each with its reason
EXCEPTIONS = {
    "loratools.formats.adapter_io": "the face of formats/: load_adapter(base=PATH) opens the base to resolve names",
    "loratools.publishing.card": "a model card describes an artifact with the info operation and the formats",
    "loratools.formats.onnx_adapter": "an .onnx_adapter is written for the slot names of an ONNX graph",
}
THIRD_PARTY_CLI = ("click", "rich")  # only loratools.cli may import them


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (the house uses absolute imports)"
            found.append((node.lineno, node.module or ""))
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".") or (prefix.endswith(".") and name.startswith(prefix))


def violations() -> list[str]:
    bad = []
    for name, path in sorted(_modules().items()):
        for line, target in _imports(name, path):
            where = f"{path.relative_to(PKG.parent)}:{line}"
            if target.split(".")[0] in THIRD_PARTY_CLI and not _under(name, "loratools.cli"):
                bad.append(f"{where}: imports {target} (only loratools.cli may)")
            if name in EXCEPTIONS:
                continue
            for who, forbidden, allowed, why in RULES:
                if not _under(name, who) or any(_under(target, a) for a in allowed):
                    continue
                if any(_under(target, f) for f in forbidden):
                    bad.append(f"{where}: {name} imports {target} ({why})")
    return bad


def test_no_module_breaks_a_layer_rule() -> None:
    assert violations() == []


def test_the_root_holds_only_packages_init_main_and_errors() -> None:
    loose = sorted(p.name for p in PKG.iterdir() if p.is_file() and p.name not in ("__init__.py", "__main__.py",
                                                                                    "errors.py", "py.typed"))
    assert loose == [], f"modules at the package root: {loose} (put each in the layer it belongs to)"
    for folder in (p for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{folder}: say its purpose"


def test_the_rules_catch_a_forbidden_arrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan is not vacuous: a model module importing a format, and click below cli/, are found."""
    fake = PKG / "model" / "adapter.py"
    extra = "\n\ndef _x():\n    import click\n    from loratools.formats import peft\n"
    text = fake.read_text(encoding="utf-8") + extra
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == fake else real(self, *a, **k))
    found = violations()
    assert any("loratools.model.adapter imports loratools.formats" in v for v in found), found
    assert any("imports click (only loratools.cli may)" in v for v in found), found


def test_old_module_paths_still_import_the_moved_modules() -> None:
    """One release of grace (issue 18): ``loratools.adapter`` is ``loratools.model.adapter`` and so on."""
    import importlib
    import warnings

    import loratools

    for old, new in loratools._MOVED.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            moved = importlib.import_module(old)
        assert moved is importlib.import_module(new), old
        assert moved.__spec__.name == new


def test_every_path_the_python_api_doc_names_resolves() -> None:
    """Each ``loratools.x.y`` in docs/python-api.md is a module or a module's attribute (issue 18: the public
    paths keep working after the move)."""
    import importlib
    import re

    doc = (PKG.parent / "docs" / "python-api.md").read_text(encoding="utf-8")
    paths = sorted(set(re.findall(r"loratools(?:\.[a-z_]+)+", doc)))
    assert paths
    for path in paths:
        module, attr = path, None
        while True:
            try:
                found = importlib.import_module(module)
                break
            except ModuleNotFoundError:
                module, _, attr = module.rpartition(".")
        assert attr is None or hasattr(found, attr), path


def test_no_module_is_over_400_lines() -> None:
    """The house rule (issue 18): a module that grows past 400 lines is split by what its parts do."""
    long = sorted(f"{p.relative_to(PKG.parent)}: {n}" for p in PKG.rglob("*.py")
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400)  # fmt: skip
    assert long == []
