"""Serving checks for the GGUF runtimes (llama.cpp, LM Studio, Ollama) that need more than the rule table.

With a base (a .gguf model or a Hugging Face folder), the adapter is planned exactly as ``convert --to
gguf`` would write it (:func:`loratools.formats.gguf.plan.plan`): every module's GGUF tensor, the loader's
shape rule against a GGUF base's tensor table, tied output, full tensors. Each problem becomes a finding
``<target>.<code>``. Without a base, the architecture comes from the adapter itself (a GGUF file's
``general.architecture``, or PEFT's ``auto_mapping.base_model_class``) when it says.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter
    from loratools.ops.validate.findings import Finding


def gguf_architecture(adapter: Adapter, base: Any = None) -> str | None:
    """The GGUF architecture the adapter is for (``llama``, ``qwen2``...), or None when nothing says."""
    from loratools.errors import LoratoolsError
    from loratools.formats.gguf.names import ARCHITECTURES, load_base

    if base is not None:
        try:
            return load_base(base).arch
        except LoratoolsError:
            return None
    if adapter.meta.get("gguf_arch"):
        return str(adapter.meta["gguf_arch"])
    cfg = adapter.meta.get("config") or {}
    cls = (cfg.get("auto_mapping") or {}).get("base_model_class")
    spec = ARCHITECTURES.get(str(cls))
    return spec.gguf_arch if spec else None


def base_findings(adapter: Adapter, target: str, base: str | Path | Any, where: str) -> list[Finding]:
    """Findings from planning the GGUF file for ``base`` (see the module docstring)."""
    from loratools.errors import LoratoolsError
    from loratools.formats.gguf.names import load_base
    from loratools.formats.gguf.plan import plan
    from loratools.ops._algebra_io import gguf_base
    from loratools.ops.validate.findings import Finding

    try:
        info = load_base(gguf_base(base))
    except LoratoolsError as exc:
        return [Finding("error", None, f"{target}.base", f"{exc.message} {where}", hint=exc.hint)]
    return [
        Finding("error", p.module, f"{target}.{p.code}", f"{p.message} {where}", hint=p.hint)
        for p in plan(adapter, info).problems
    ]
