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
    out = []
    for family, group in _by_family(plan(adapter, info).problems).items():
        code, first = family[0], group[0]
        if code == "expert" and target == "llama.cpp":
            continue  # the rule table's llama.cpp.experts names every expert module already, in one line
        more = f" (+{len(group) - 1} more of {family[1]})" if len(group) > 1 else ""
        module = first.module if len(group) == 1 else None
        out.append(Finding("error", module, f"{target}.{code}", f"{first.message}{more} {where}", hint=first.hint))
    return out


def _by_family(problems: list[Any]) -> dict[tuple[str, str], list[Any]]:
    """Problems grouped by code and tensor family: the module path with its layer and expert indices as ``*``
    (``model.layers.*.mlp.experts.down_proj[*]``), so a MoE's hundreds of expert slices are one line each."""
    import re

    groups: dict[tuple[str, str], list[Any]] = {}
    for p in problems:
        family = re.sub(r"\[\d+\]$", "[*]", re.sub(r"\.\d+(?=\.)", ".*", p.module or ""))
        groups.setdefault((p.code, family), []).append(p)
    return groups


def _family(cls: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]", "", re.sub(r"(For[A-Z]\w*|LMHeadModel)$", "", cls).lower())


def unmapped_model(adapter: Adapter, base: Any = None) -> str | None:
    """The model the adapter is for when loratools has no GGUF mapping for it (``Phi3ForCausalLM``), else None.

    With a base, the base decides (``convert --to gguf --base`` refuses it the same way); without one, what
    the adapter says it was trained on: PEFT's ``auto_mapping`` class, or the recorded base model's
    config when that resolves locally or in the Hugging Face cache (ops/base_match)."""
    from loratools.errors import LoratoolsError, UnsupportedError
    from loratools.formats.gguf.names import ARCHITECTURES, load_base

    if adapter.format == "gguf":
        return None
    if base is not None:
        from loratools.ops._algebra_io import gguf_base

        try:
            load_base(gguf_base(base))
        except UnsupportedError as exc:
            return exc.message
        except LoratoolsError:
            return None
        return None
    cfg = adapter.meta.get("config") if isinstance(adapter.meta.get("config"), dict) else {}
    mapping = cfg.get("auto_mapping") if isinstance(cfg.get("auto_mapping"), dict) else {}
    cls = mapping.get("base_model_class")
    if isinstance(cls, str) and cls in ARCHITECTURES:
        return None
    known = {_family(c) for c in ARCHITECTURES}
    from loratools.ops.base_match.facts import claimed_base

    try:
        claim = claimed_base(adapter)
    except LoratoolsError:
        claim = None
    said = set(claim.model_types | claim.families) if claim is not None else set()
    if isinstance(cls, str) and cls.startswith(tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")):
        said.add(_family(cls))
    if not said or said & known:
        return None
    return cls if isinstance(cls, str) and cls else sorted(said)[0]


def tied_findings(adapter: Adapter, target: str, where: str) -> list[Finding]:
    """Without a base: an embedding LoRA for llama.cpp, whose runtime also applies a ``token_embd`` LoRA to a
    tied output and aborts. Gemma and Gemma 2 always tie (an error, :func:`~loratools.formats.gguf.plan.
    tied_problem`'s); for other architectures a warning that only the base can tell."""
    from loratools.formats.gguf.names import BY_GGUF_ARCH, GgufBase
    from loratools.formats.gguf.plan import tied_problem
    from loratools.formats.gguf.rewrites import TOKEN_EMBD
    from loratools.ops.validate.findings import Finding

    spec = BY_GGUF_ARCH.get(str(gguf_architecture(adapter)))
    out = []
    for name, m in adapter.modules.items():
        if m.kind != "embedding" or spec is None:
            continue
        if spec.output_dropped:
            p = tied_problem(name, m, GgufBase(where, spec, 0, 0, 0, tied=True), TOKEN_EMBD, merge=False)
            if p is not None:
                out.append(Finding("error", name, f"{target}.{p.code}", f"{p.message} {where}", hint=p.hint))
            continue
        out.append(
            Finding(
                "warning",
                name,
                f"{target}.tied_embedding",
                f"{name}: an embedding LoRA aborts llama.cpp when the base ties lm_head to the token embeddings "
                f"{where}",
                hint="pass --base (the .gguf model or Hugging Face folder) to check; on a tied base, merge instead",
            )
        )
    return out
