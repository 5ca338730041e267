"""Serving compatibility: what a runtime (vLLM, SGLang, llama.cpp, ONNX Runtime GenAI) would reject or ignore.

The rules are data, in ``serving_rules.json`` beside this module: each names a condition, a severity, a message and
the runtime version and source it was read from. This module only evaluates the conditions below on an
adapter; a runtime change is an edit of the JSON file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from loratools.errors import UsageError

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter
    from loratools.ops.validate.findings import Finding

_KOHYA_NAME = re.compile(r"^lora_[a-z0-9]+_[A-Za-z0-9_]+$")
#: formats that only ever hold diffusion-pipeline adapters (kohya / LyCORIS files, diffusers LoRAs)
_PIPELINE_FORMATS = ("kohya", "diffusers", "lycoris", "comfyui")


def is_pipeline_adapter(adapter: Adapter, base_kind: str | None = None) -> bool:
    """Whether ``adapter`` adapts a diffusion pipeline rather than a language model.

    Decided from the base (a diffusers pipeline folder) or the format, never from a name prefix:
    GPT-2, Falcon, Bloom and ChatGLM name their blocks ``transformer.…`` like a pipeline component.
    """
    return base_kind == "pipeline" or adapter.format in _PIPELINE_FORMATS


@cache
def serving_rules() -> dict[str, Any]:
    """The rule table, keyed by runtime name (``vllm``, ``sglang``, ``llama.cpp``, ``onnxruntime-genai``)."""
    text = resources.files("loratools.ops.validate").joinpath("serving_rules.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def serving_targets() -> list[str]:
    return sorted(serving_rules())


def _modules_where(adapter: Adapter, pred: Callable[[Any], bool]) -> list[str]:
    return [n for n, m in adapter.modules.items() if pred(m)]


def _scale_varies(adapter: Adapter) -> list[str]:
    scales = Counter(round(m.scale, 12) for m in adapter.modules.values() if m.scale is not None)
    if len(scales) <= 1:
        return []
    common = scales.most_common(1)[0][0]
    return [n for n, m in adapter.modules.items() if m.scale is not None and round(m.scale, 12) != common]


def _alpha_varies(adapter: Adapter) -> list[str]:
    alphas = Counter(float(m.alpha) for m in adapter.modules.values() if m.alpha is not None)
    if len(alphas) <= 1:
        return []
    common = alphas.most_common(1)[0][0]
    return [n for n, m in adapter.modules.items() if m.alpha is not None and float(m.alpha) != common]


def _leaf(name: str) -> str:
    """A module's last name; an expert slice's (``…experts.down_proj[3]``) without its expert index."""
    return name.rsplit(".", 1)[-1].split("[", 1)[0]


def expert_conditions(adapter: Adapter) -> dict[str, list[str]]:
    from loratools.ops.validate.expert_serving import expert_conditions as conditions

    return conditions(adapter)


def _conditions(
    adapter: Adapter, rules: dict[str, Any], settings: dict[str, Any], base_kind: str | None = None, base: Any = None
) -> dict[str, list[str]]:
    """condition name -> the modules (or tensor names) it applies to; empty when it does not apply."""
    max_rank = settings.get("max_lora_rank")
    allowed = set(rules.get("settings", {}).get("allowed_max_lora_ranks") or [])
    if max_rank is not None and allowed and int(max_rank) not in allowed:
        accepted = ", ".join(map(str, sorted(allowed)))
        raise UsageError(f"max_lora_rank {max_rank} is not a value {rules['runtime']} accepts ({accepted})")
    targets = set(rules.get("linear_targets") or [])
    return {
        "always": ["*"],
        "dora": _modules_where(adapter, lambda m: m.magnitude is not None),
        "family": _modules_where(adapter, lambda m: m.family != "lora"),
        "bias": _modules_where(adapter, lambda m: m.bias is not None),
        "rslora": _modules_where(adapter, lambda m: m.use_rslora),
        "conv": _modules_where(adapter, lambda m: m.kind == "conv"),
        "embedding": _modules_where(adapter, lambda m: m.kind == "embedding"),
        "modules_to_save": sorted(adapter.replacements),
        "rank_above_max": (_modules_where(adapter, lambda m: m.rank > int(max_rank)) if max_rank is not None else []),
        "scale_varies": _scale_varies(adapter),
        "alpha_varies": _alpha_varies(adapter),
        "not_llm": sorted(adapter.modules) if is_pipeline_adapter(adapter, base_kind) else [],
        "unknown_target": (
            [n for n in adapter.modules if _leaf(n) not in targets and not _KOHYA_NAME.match(n)]
            if targets
            else []
        ),
        **(_gguf_conditions(adapter, settings, base) if rules.get("gguf") else {}),
        **expert_conditions(adapter),  # expert LoRA (expert_serving.py)
    }


def _gguf_conditions(adapter: Adapter, settings: dict[str, Any], base: Any) -> dict[str, list[str]]:
    """Conditions of the GGUF runtimes: an adapter that is not a GGUF file yet; Ollama's own importer
    (architectures it converts, an integer lora_alpha)."""
    from loratools.ops.validate.gguf_serving import gguf_architecture, unmapped_model

    gguf_file = adapter.format == "gguf"
    arch = None if gguf_file else gguf_architecture(adapter, base)
    unmapped = unmapped_model(adapter, base) if arch is None else None  # convert --to gguf refuses it
    converts = set(settings.get("importer_architectures") or [])
    gguf_only = {"rslora": [], "alpha_varies": [], "scale_varies": []} if gguf_file else {}
    planned = {"modules_to_save": []} if base is not None else {}  # the plan against the base decides
    return {
        **gguf_only,
        **planned,
        "not_gguf": [] if gguf_file or unmapped else ["*"],  # nothing to pre-build for an unmapped model
        "alpha_not_integer": [] if gguf_file else _modules_where(adapter, _alpha_not_integer),
        "arch_not_imported": ["*"] if converts and ((arch is not None and arch not in converts) or unmapped) else [],
        # with a base, the base's own finding says it (naming its config); without one, what the adapter says
        "arch_unknown": ["*"] if unmapped and base is None else [],
        "arch_unmapped": [unmapped] if unmapped else [],
        # mlx-lm writes a raw lora_parameters.scale, which Ollama's importer never reads (it takes an alpha)
        "mlx_scale": ["*"] if adapter.format == "mlx" else [],
    }


#: the way out for a model loratools cannot write a GGUF adapter for (no hint may suggest convert --to gguf then)
_UNMAPPED_HINT = "merge the adapter and convert the merged model with llama.cpp's convert_hf_to_gguf.py"


def _alpha_not_integer(m: Any) -> bool:
    return m.alpha is not None and not float(m.alpha).is_integer()


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return f"{shown} (+{len(names) - 3} more)" if len(names) > 3 else shown


def serving_findings(
    adapter: Adapter, target: str, *, base_kind: str | None = None, base: Any = None, **settings: Any
) -> list[Finding]:
    """Findings for what ``target`` would reject or silently ignore in ``adapter``.

    ``settings`` override the runtime's defaults from the rule table (``max_lora_rank=64`` for vLLM,
    say). Each finding's code is ``<target>.<rule id>``; its message ends with the runtime version and
    source the rule was read from. ``base_kind`` ("pipeline", "folder", "file") is the base's, when
    validating against one. For the GGUF runtimes (rules with ``"gguf": true``) ``base`` (a .gguf model
    or a Hugging Face folder) also plans the GGUF file exactly as ``convert --to gguf`` writes it.
    """
    from loratools.ops.validate.findings import Finding

    table = serving_rules()
    if target not in table:
        raise UsageError(f"unknown serving target {target!r}; known: {', '.join(sorted(table))}")
    rules = table[target]
    effective = {**rules.get("settings", {}), **{k: v for k, v in settings.items() if v is not None}}
    found = _conditions(adapter, rules, effective, base_kind, base)
    where = f"[{rules['runtime']}, {rules['version']}; {rules['sources'][0]}]"
    out: list[Finding] = []
    for rule in rules["rules"]:
        hits = found.get(rule["when"])
        if hits is None:
            raise UsageError(f"serving rule {target}.{rule['id']} uses unknown condition {rule['when']!r}")
        if not hits or (found["not_llm"] and rule["when"] != "not_llm"):
            continue  # a diffusion LoRA gets the one finding that says so
        message, hint = rule["message"], rule.get("hint")
        if found.get("arch_unmapped") and (hint is None or "--to gguf" in hint):
            hint = _UNMAPPED_HINT  # the suggested convert would refuse this model
        if rule["when"] == "arch_unknown":
            message = f"{found['arch_unmapped'][0]}: {message}"
        if rule["when"] == "rank_above_max":
            ranks = sorted({adapter.modules[n].rank for n in hits})
            message = f"rank {ranks[-1]} > max_lora_rank {effective.get('max_lora_rank')}: {message}"
        if hits != ["*"]:
            message = f"{message}: {_listing(hits)}"
        out.append(
            Finding(
                severity=rule["severity"],
                module=hits[0] if len(hits) == 1 and hits != ["*"] else None,
                code=f"{target}.{rule['id']}",
                message=f"{message} {where}",
                hint=hint,
            )
        )
    if rules.get("gguf") and base is not None and not found["not_llm"]:
        from loratools.ops.validate.gguf_serving import base_findings

        out += base_findings(adapter, target, base, where)
    elif rules.get("gguf") and not found["not_llm"]:
        from loratools.ops.validate.gguf_serving import tied_findings

        out += tied_findings(adapter, target, where)
    return out
