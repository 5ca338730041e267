"""Serving conditions for expert LoRA (``serving_rules.json`` names them; issue 20).

- ``experts``: every expert update, fused slices and per-expert modules alike (llama.cpp has no expert LoRA);
- ``experts_fused``: PEFT ``target_parameters`` slices (``experts.base_layer.lora_*`` on disk);
- ``experts_fused_not_3d``: such slices for a model vLLM does not hold as 3-D experts (no ``is_3d_moe_weight``):
  it loads per-expert modules there;
- ``experts_fused_partial``: a layer with gate_up_proj adapted but not down_proj, or the reverse (vLLM's 3-D path
  needs both of a layer);
- ``experts_fused_extra_params``: the ``target_parameters`` of a file with expert slices when it lists more than
  the two expert parameters (a router ``mlp.gate.weight``): SGLang's PEFT normalizer refuses more than two;
- ``experts_fused_rank_off``: expert parameters whose rank is not the config's ``r`` (a ``rank_pattern``): SGLang
  reshapes every ``(E·r, in)`` / ``(out, r·E)`` pair with the adapter's one ``r``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter


def expert_conditions(adapter: Adapter) -> dict[str, list[str]]:
    from loratools.formats.peft.experts import model_type
    from loratools.formats.vllm_moe import VLLM_3D_MODEL_TYPES
    from loratools.model.experts import expert_groups, is_expert
    from loratools.model.per_expert import PER_EXPERT

    slices = sorted(n for n, m in adapter.modules.items() if is_expert(m))
    per_expert = sorted(n for n in adapter.modules if PER_EXPERT.match(n))
    if adapter.format == "vllm-moe":  # per-expert modules on disk, read back as slices
        slices, per_expert = [], slices + per_expert
    fused = slices
    cfg = adapter.meta.get("config") if isinstance(adapter.meta.get("config"), dict) else {}
    not_3d = fused if fused and model_type(cfg, None) not in VLLM_3D_MODEL_TYPES else []
    containers: dict[str, set[str]] = {}
    for parameter in expert_groups(adapter) if fused else ():
        container, _, leaf = parameter.rpartition(".")
        containers.setdefault(container, set()).add(leaf)
    partial = sorted(c for c, leaves in containers.items() if leaves != {"gate_up_proj", "down_proj"})
    listed = cfg.get("target_parameters") if fused and isinstance(cfg.get("target_parameters"), list) else []
    r = cfg.get("r")
    rank_off = sorted({m.parameter for n, m in adapter.modules.items() if n in fused and m.rank != r}) if r else []
    return {
        "experts": fused + per_expert,
        "experts_fused": fused,
        "experts_fused_not_3d": not_3d,
        "experts_fused_partial": partial if not not_3d else [],
        "experts_fused_extra_params": [str(t) for t in listed] if len(listed) > 2 else [],
        "experts_fused_rank_off": rank_off,
    }
