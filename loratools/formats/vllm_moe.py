"""The per-expert MoE LoRA layout vLLM and SGLang load (``--to vllm-moe``): a PEFT folder whose expert LoRAs are
plain per-expert modules.

Read in the servers' own code (docs/formats.md cites the files and commits):

- vLLM (``vllm/lora/lora_model.py``, ``model_manager.py``): a model without ``is_3d_moe_weight`` (Qwen2/3-MoE,
  Mixtral, DeepSeek-V2/V3, OLMoE ...) takes ``…experts.{e}.gate_proj|up_proj|down_proj.lora_A/B.weight`` (Mixtral:
  ``block_sparse_moe.experts.{e}.w1|w3|w2``), each ``(r, in)`` / ``(out, r)``, and packs them itself; a model
  with ``is_3d_moe_weight`` (gpt-oss, Qwen3.5-MoE, Qwen3-VL-MoE, GLM-4-MoE-Lite) takes PEFT's ``target_parameters``
  file (``experts.base_layer`` = gate_up_proj, ``experts`` = down_proj), which ``--to peft`` writes.
- SGLang (``python/sglang/srt/lora/lora.py``): the same per-expert names, and PEFT's target_parameters file as it
  is (``LoRAAdapter._normalize_peft_paramwrapper_moe``; at most two parameters, one ``r``): no layout of its own.

So the file is an ordinary PEFT adapter (PEFT with transformers 5 loads it too, fusing the experts itself); what
marks it as this layout is loratools' record in the safetensors metadata (``loratools.experts``: naming scheme,
expert count, which plain modules were parameter wrappers), so reading it back gives the expert slices again:
``peft -> vllm-moe -> peft`` is the identity. A per-expert PEFT file without that record reads as plain modules
(``--format vllm-moe`` reads it as expert slices).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, UnsupportedError
from loratools.formats.registry import AdapterFormat, register_format

if TYPE_CHECKING:
    from loratools.formats.registry import KeyResolver
    from loratools.model.adapter import Adapter

WEIGHTS = "adapter_model.safetensors"
RECORD = "loratools.experts"
#: vLLM models with ``is_3d_moe_weight = True`` (they take PEFT's target_parameters file, not per-expert modules)
VLLM_3D_MODEL_TYPES = frozenset({"gpt_oss", "qwen3_5_moe", "qwen3_vl_moe", "glm4_moe_lite", "interns1_pro"})


def _record(path: Path) -> dict[str, Any] | None:
    from loratools.files.safetensors_file import read_header

    weights = path / WEIGHTS
    if not (path.is_dir() and (path / "adapter_config.json").is_file() and weights.is_file()):
        return None
    try:
        _, metadata = read_header(weights)
    except FormatError:
        return None  # the PEFT reader names what is wrong with the file
    raw = (metadata or {}).get(RECORD)
    try:
        rec = json.loads(raw) if raw else None
    except ValueError:
        rec = None
    return rec if isinstance(rec, dict) else ({} if raw else None)


@register_format
class VllmMoeFormat(AdapterFormat):
    name = "vllm-moe"
    layout = "folder"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return _record(path) is not None

    @classmethod
    def read(cls, path: Path, base: KeyResolver | None = None) -> Adapter:
        from loratools.errors import LoratoolsError
        from loratools.formats.peft.format import PeftFormat
        from loratools.model.per_expert import fuse_experts

        rec = _record(path) or {}
        adapter = PeftFormat.read(path, base)
        counts = rec.get("num_experts") or {}
        weights = path / WEIGHTS
        if not isinstance(counts, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in counts.values()
        ):
            raise FormatError(
                f"{weights}: metadata {RECORD} num_experts must map parameters to positive expert counts, got "
                f"{str(counts)[:80]}",
                hint="the file was edited or damaged; write it again (loratools convert ADAPTER --to vllm-moe -o OUT)",
                path=weights,
            )
        try:
            fused = fuse_experts(adapter, (lambda p: counts.get(p) or 0) if counts else None)
        except LoratoolsError as exc:
            raise type(exc)(f"{weights}: {exc.message}", hint=exc.hint, path=weights) from None
        routers = rec.get("param_modules")
        fused.meta.update(
            format="vllm-moe",
            config_modules=None,
            param_modules=[r for r in routers if r in fused.modules] if isinstance(routers, list) else [],
        )
        targets, selected = rec.get("target_parameters"), rec.get("config_parameters")
        if isinstance(targets, list) and isinstance(selected, list):  # the PEFT file's own short names, kept
            fused.meta["config"] = {**(fused.meta.get("config") or {}), "target_parameters": targets}
            fused.meta["config_parameters"] = selected
        return fused

    @classmethod
    def write(cls, adapter: Adapter, path: Path, provenance: dict[str, Any] | None = None, **options: Any) -> None:
        from loratools.files.safetensors_file import load_file, save_file
        from loratools.formats.peft.experts import model_type
        from loratools.formats.peft.format import PeftFormat
        from loratools.model.experts import expert_groups
        from loratools.model.per_expert import scheme_for, split_experts

        cfg = adapter.meta.get("config") if isinstance(adapter.meta.get("config"), dict) else {}
        mt = model_type(cfg, None)
        if mt in VLLM_3D_MODEL_TYPES:
            raise UnsupportedError(
                f"writing vllm-moe: the adapter's model ({mt}) is one vLLM holds with 3-D experts "
                "(is_3d_moe_weight): it loads PEFT's target_parameters file, not per-expert modules",
                hint="write PEFT instead: loratools convert ADAPTER --to peft -o OUT",
            )
        groups = expert_groups(adapter)
        scheme = scheme_for(mt)
        plain = split_experts(adapter, scheme)
        routers = [n for n in adapter.meta.get("param_modules") or [] if n in adapter.modules]
        plain.meta = {k: v for k, v in plain.meta.items() if k not in ("param_modules", "config_parameters")}
        plain.meta["config_modules"] = None
        PeftFormat.write(plain, path, provenance=provenance)
        weights = path / WEIGHTS
        tensors, metadata = load_file(weights)
        record = {
            "layout": "per-expert",
            "scheme": scheme,
            "num_experts": {p: s[0].num_experts for p, s in groups.items()},
            "param_modules": routers,
        }
        selected = adapter.meta.get("config_parameters")
        if isinstance(selected, list) and isinstance(cfg.get("target_parameters"), list):
            record.update(target_parameters=cfg["target_parameters"], config_parameters=selected)
        save_file(tensors, str(weights), metadata={**metadata, RECORD: json.dumps(record, sort_keys=True)})
        _add_fused_targets(path / "adapter_config.json", groups, scheme, routers)


def _add_fused_targets(cfg_file: Path, groups: dict[str, Any], scheme: str, routers: list[str]) -> None:
    """``target_modules`` gets, beside every per-expert path, its container without the expert index (and
    Mixtral's router under ``mlp``): the names PEFT >= 0.22 turns into transformers 5's fused parameters.

    PEFT 0.22's MoE config conversion (``peft/utils/transformers_weight_conversion.py``,
    ``_convert_peft_config_moe``, PR #3715 for issue #3711) keeps a dotted target's path and renames only its
    leaf: ``…experts.0.gate_proj`` becomes ``…experts.0.gate_up_proj``, a parameter no model has, which it then
    skips without a word (0.21 kept only the leaf, ``gate_up_proj``, and matched every layer). The added
    ``…mlp.experts.gate_proj`` becomes ``…mlp.experts.gate_up_proj``, the real one; on transformers 4 (experts
    as linears) and in vLLM / SGLang, which go by the tensors' names, it matches nothing and changes nothing.
    """
    from loratools.model.per_expert import SCHEMES

    parts = SCHEMES[scheme][1]
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):
        return
    extra = set()
    for parameter in groups:
        container, _, leaf = parameter.rpartition(".")
        extra.update(f"{container}.{part}" for part in parts.get(leaf, ()))
    extra.update(r for r in routers if r.endswith(".mlp.gate"))  # Mixtral's is written as block_sparse_moe.gate
    cfg["target_modules"] = targets + sorted(extra - set(targets))
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
