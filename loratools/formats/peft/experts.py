"""PEFT ``target_parameters`` adapters (``lora.ParamWrapper``, PEFT ≥ 0.17) into expert slices.

What PEFT 0.21 writes (``peft/tuners/lora/layer.py``, ``ParamWrapper``; ``tuners_utils.py``,
``_inject_parameters``), read in its code and checked against its ``get_delta_weight`` in tests/moe:

- A wrapper adapts one parameter of a module; the saved keys name the module, not the parameter. Two
  targeted parameters of one module are nested wrappers: PEFT walks the module's parameters in registration
  order and wraps the module again for each, so ``<module>.base_layer.lora_*`` is the parameter registered
  first and ``<module>.lora_*`` the last (``REGISTRATION_ORDER``; not the config's sorted list).
- A 3-D parameter ``(E, d1, d2)`` gets ``lora_A`` ``(E·r, in)`` and ``lora_B`` ``(out, E·r)``: expert e's A is
  rows ``e·r … e·r+r-1`` (``A.reshape(E, r, in)[e]``), its B columns ``k·E+e`` (``B.reshape(out, r, E)[:, :, e]``).
  ``in``/``out`` are ``d2``/``d1`` unless the experts module says ``is_transposed`` (then ``d1``/``d2``, and
  ΔW[e] = (B_e·A_e)ᵀ). r and alpha come from the config, ``rank_pattern``/``alpha_pattern`` matched against the
  parameter's path (``model.layers.1.mlp.experts.down_proj``); scale = alpha/r (alpha/√r with rsLoRA).
- A 2-D parameter (a router ``weight``) is an ordinary LoRA: ``lora_A`` (r, in), ``lora_B`` (out, r).
- ParamWrapper refuses dropout, fan_in_fan_out, lora_bias and DoRA, so none of those appear.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, NumericError, ShapeError, UnsupportedError

if TYPE_CHECKING:
    import torch

    from loratools.formats.registry import KeyResolver
    from loratools.model.adapter import LoraModule

CONFIG = "adapter_config.json"
#: the order every transformers 5.25 experts class registers these parameters in (their ``__init__``s)
REGISTRATION_ORDER = ("gate_proj", "gate_up_proj", "up_proj", "down_proj")
#: model types whose experts class is ``@use_experts_implementation(is_transposed=True)``: each expert ``(in, out)``
TRANSPOSED_MODEL_TYPES = frozenset({"gpt_oss", "aria", "openai_privacy_filter"})
#: model types whose 3-D expert parameters PEFT sees as ``(E, out, in)`` (transformers 5.25; llama4's
#: undecorated class included: PEFT finds no ``is_transposed`` there either)
STRAIGHT_MODEL_TYPES = frozenset(
    "afmoe axk1 axk2 bailing_hybrid beam cohere2_moe deepseek_ocr2 deepseek_v2 deepseek_v3 deepseek_v32 "
    "deepseek_v4 diffusion_gemma dots1 dots3_note ernie4_5_moe ernie4_5_vl_moe exaone_moe flex_olmo flint gemma4 "
    "glm4_moe glm4_moe_lite glm4v_moe glm5_next glm_moe_dsa granitemoe granitemoe_swa granitemoehybrid "
    "granitemoeshared hunyuan_v1_moe hy_v3 hy_v4 hy_v4_vl inkling inkling2 inkling2_loop jamba kimi_linear "
    "kolibri1 kolibri1_1 laguna lara_mini lfm2_moe llama4 longcat_flash mellum mimo_v2_flash minicpm5_moe minimax "
    "minimax_m2 minimax_m3_vl mistral4 mistral_large4 mixtral muse_spark nemotron_h olmoe phimoe qwen2_moe "
    "qwen3_5_moe qwen3_moe qwen3_next qwen3_omni_moe qwen3_vl_moe qwen4_exp solar_open step3p7 unlimited_ocr "
    "zaya".split()
)
#: config keys that hold the routed expert count, by family (Qwen, Mixtral/gpt-oss, DeepSeek)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_BASE_LAYER = ".base_layer"


def rank_problem(mod: str, a_name: str, a: tuple[int, ...], b_name: str, b: tuple[int, ...]) -> tuple[str, str]:
    """``(code, message)`` for a PEFT module whose lora_A rows and lora_B columns disagree. A 3-D pair
    ``(E, r, in)`` / ``(E, out, r)`` is an expert LoRA stacked the way SGLang and vLLM hold it in memory (and
    some exporters save it under ``experts.<module>``): which axis is the expert is a guess, so it is named."""
    if len(a) == 3 and len(b) == 3 and a[0] == b[0] and a[1] == b[2] and a[0] != b[1]:
        return "stacked_experts", (
            f"module {mod}: {a_name} {list(a)} and {b_name} {list(b)} are a stacked expert LoRA "
            "((E, r, in) / (E, out, r), the layout SGLang and vLLM hold in memory), which loratools does not read; "
            "it reads PEFT target_parameters ((E·r, in) / (out, r·E)) and per-expert modules (experts.{e}.gate_proj …)"
        )
    return "rank_mismatch", f"module {mod}: {a_name} has rank {a[0]} but {b_name} has rank {b[1]}"


def model_type(cfg: dict[str, Any], base: KeyResolver | None) -> str | None:
    """The model type the adapter's experts module comes from: the adapter config's ``auto_mapping``
    (``transformers.models.<type>.modeling_<type>``: the model it was trained on), else the base's config;
    None when neither names a type loratools knows."""
    auto = cfg.get("auto_mapping") or {}
    lib = auto.get("parent_library") if isinstance(auto, dict) else None
    m = re.fullmatch(r"transformers\.models\.(\w+)\.modeling_\w+", lib) if isinstance(lib, str) else None
    if m and (m[1] in TRANSPOSED_MODEL_TYPES or m[1] in STRAIGHT_MODEL_TYPES):
        return m[1]
    bcfg = (base.config or {}) if base is not None else {}
    for c in (bcfg, bcfg.get("text_config") or {}):
        mt = c.get("model_type") if isinstance(c, dict) else None
        if isinstance(mt, str):
            for name in (mt, mt.removesuffix("_text")):
                if name in TRANSPOSED_MODEL_TYPES or name in STRAIGHT_MODEL_TYPES:
                    return name
    return None


def expert_count(base: KeyResolver | None) -> tuple[int, str] | None:
    """``(E, config key)`` from the base's config.json, when it names the routed expert count."""
    bcfg = (base.config or {}) if base is not None else {}
    for c in (bcfg, bcfg.get("text_config") or {}):
        for key in EXPERT_COUNT_KEYS:
            v = c.get(key) if isinstance(c, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v, key
    return None


#: adapter_config.json key naming how lora_B packs the experts, for files no PEFT version wrote
PACKING_KEY = "expert_lora_b_layout"


def b_packing(cfg: dict[str, Any], where: Path, ours: bool) -> str | None:
    """``interleaved`` (PEFT's order) or ``blocked``: the config's own word, else interleaved when PEFT or
    loratools wrote the file; None when nothing says (a refusal, once a rank above 1 makes the orders differ)."""
    said = cfg.get(PACKING_KEY)
    if said is not None:
        if said not in ("interleaved", "blocked"):
            raise FormatError(
                f"{where}: {PACKING_KEY} must be 'interleaved' or 'blocked', got {said!r}", path=where
            )
        return str(said)
    return "interleaved" if ours or isinstance(cfg.get("peft_version"), str) else None


def expert_meta(modules: dict[str, Any]) -> dict[str, Any]:
    """What the writer needs to put the wrappers back: the 2-D wrapped modules and every wrapped parameter."""
    from loratools.model.experts import is_expert

    if not modules:
        return {}
    routers = sorted(n for n, m in modules.items() if not is_expert(m))
    params = {m.parameter for m in modules.values() if is_expert(m)} | {f"{n}.weight" for n in routers}
    return {"param_modules": routers, "config_parameters": sorted(params)}


def _targets(cfg: dict[str, Any], where: Path) -> list[tuple[str, str]]:
    """``target_parameters`` as ``(module suffix, parameter name)`` pairs, checked."""
    raw = cfg.get("target_parameters")
    if not isinstance(raw, list) or not all(isinstance(t, str) and t for t in raw):
        raise FormatError(f"{where}: target_parameters must be a list of parameter names, got {raw!r}", path=where)
    pairs = []
    for t in raw:
        mod, _, param = t.rpartition(".")
        if not mod:
            raise UnsupportedError(
                f"{where}: target_parameters entry {t!r} names a parameter but no module; loratools needs the "
                "module part to tell which modules' LoRA tensors are parameter wrappers",
                hint="write it with its module, as PEFT's docs do: 'mlp.experts.gate_up_proj'",
                path=where,
            )
        pairs.append((mod, param))
    return pairs


def _host(module: str) -> tuple[str, int]:
    """``(wrapped module, nesting depth)`` of a LoRA key's module: ``a.experts.base_layer`` -> ``(a.experts, 1)``."""
    depth = 0
    while module.endswith(_BASE_LAYER):
        module, depth = module[: -len(_BASE_LAYER)], depth + 1
    return module, depth


def _order(params: list[str], host: str, levels: int, where: Path) -> list[str]:
    """The parameters of ``host`` wrapped at depth 0, 1, … (outermost first), refused when not certain."""
    if levels == 1 and len(params) == 1:
        return params
    unknown = [p for p in params if p not in REGISTRATION_ORDER]
    if levels != len(params) or (levels > 1 and unknown):
        raise UnsupportedError(
            f"{where}: module {host} holds {levels} nested LoRA wrapper(s) but target_parameters names "
            f"{len(params)} of its parameters ({', '.join(params)}); which tensor belongs to which parameter "
            "depends on the order the model registers them, which loratools "
            + ("does not know for " + ", ".join(unknown) if unknown else "cannot tell from the file"),
            hint="list exactly the parameters the module has in target_parameters of adapter_config.json",
            path=where,
        )
    first = sorted(params, key=REGISTRATION_ORDER.index)  # registered first = innermost = deepest
    return first[::-1]


def _check_finite(t: torch.Tensor, key: str, where: Path, expert_of: Any) -> None:
    """NumericError naming the file, the tensor, the first NaN/Inf entry and the expert it belongs to."""
    from loratools.model.finite import first_nonfinite

    if t.is_meta:  # a lean read: the eager read checks it
        return
    first = first_nonfinite(t)
    if first is not None:
        raise NumericError(
            f"{where}: tensor {key} holds NaN/Inf values (first at index {first}: {float(t[tuple(first)])}, "
            f"{expert_of(first)})",
            hint="the training run diverged or the file is damaged; nothing was written",
            path=where,
        )


def read_param_wrappers(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    folder: Path,
    weights_file: Path,
    base: KeyResolver | None,
    rank_of: Any,
    alpha_of: Any,
    rslora: bool,
    split_key: Any,
    ours: bool = False,
) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
    """The modules of every ParamWrapper in ``tensors`` and the tensors left for the ordinary reader.

    ``rank_of(path)`` / ``alpha_of(path)`` are the config's r / lora_alpha for a parameter path (its
    patterns applied), ``split_key(key)`` the format's ``(module, role)`` of a tensor key. Expert slices come
    back keyed ``<parameter>[<e>]``; a 2-D ``weight`` as its module.
    """
    cfg_file = folder / CONFIG
    targets = _targets(cfg, cfg_file)
    levels: dict[str, dict[int, dict[str, tuple[str, torch.Tensor]]]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        mod, role = split_key(key)
        host, depth = _host(mod) if role is not None else (mod, 0)
        params = [p for m, p in targets if host == m or host.endswith("." + m)]
        if role is None or not params:
            if role is not None and depth:
                raise FormatError(
                    f"{weights_file}: tensor {key} is a nested LoRA wrapper, but target_parameters names no "
                    f"parameter of {host}",
                    hint="the adapter_config.json does not belong to these tensors",
                    path=weights_file,
                )
            rest[key] = t
            continue
        levels.setdefault(host, {}).setdefault(depth, {})[role] = (key, t)
    model = model_type(cfg, base)
    counted = expert_count(base)
    packing = b_packing(cfg, cfg_file, ours)
    modules: dict[str, LoraModule] = {}
    for host, by_depth in sorted(levels.items()):
        params = list(dict.fromkeys(p for m, p in targets if host == m or host.endswith("." + m)))
        if sorted(by_depth) != list(range(len(by_depth))):
            raise FormatError(
                f"{weights_file}: module {host} has LoRA wrappers at nesting depths {sorted(by_depth)}; PEFT "
                "nests them without gaps",
                path=weights_file,
            )
        order = _order(params, host, len(by_depth), cfg_file)
        experts = set()
        for depth, param in enumerate(order):
            made = _wrapper(
                host, param, by_depth[depth], weights_file, (rank_of, alpha_of, rslora), model, counted, packing
            )
            experts |= {m.num_experts for m in made.values() if hasattr(m, "num_experts")}
            modules.update(made)
        if len(experts) > 1:
            raise ShapeError(
                f"{weights_file}: the parameters of {host} disagree on the expert count ({sorted(experts)}: rows of "
                "lora_A / rank); rank_pattern in adapter_config.json contradicts the tensors",
                path=weights_file,
            )
    return modules, rest


def _wrapper(
    host: str,
    param: str,
    roles: dict[str, tuple[str, torch.Tensor]],
    where: Path,
    scaling: tuple[Any, Any, bool],
    model: str | None,
    counted: tuple[int, str] | None,
    packing: str | None = "interleaved",
) -> dict[str, LoraModule]:
    """The module(s) of one wrapper: the E expert slices of a 3-D parameter, or one LoRA for a 2-D weight."""
    from loratools.model.adapter import LoraModule
    from loratools.model.experts import ExpertLoraModule, expert_key

    path = f"{host}.{param}"
    extra = sorted(set(roles) - {"down", "up"})
    if extra or "down" not in roles or "up" not in roles:
        what = "a LoRA bias, DoRA or embedding tensors" if extra else "both lora_A and lora_B"
        raise FormatError(
            f"{where}: the LoRA of parameter {path} must hold exactly lora_A and lora_B (PEFT's ParamWrapper "
            f"has no {what})" if extra else f"{where}: the LoRA of parameter {path} lacks {what}",
            path=where,
        )
    (a_key, a), (b_key, b) = roles["down"], roles["up"]
    if a.ndim != 2 or b.ndim != 2:
        raise ShapeError(f"{where}: {a_key} and {b_key} must be 2-D, got {list(a.shape)} and {list(b.shape)}")
    rank_of, alpha_of, rslora = scaling
    r, alpha = rank_of(path), alpha_of(path)
    rows = int(a.shape[0])
    if r <= 0 or rows % r:
        raise ShapeError(
            f"{where}: {a_key} has {rows} rows, not a multiple of the rank {r} that adapter_config.json gives "
            f"{path} (r / rank_pattern); a target_parameters LoRA holds experts x rank rows",
            hint="fix r / rank_pattern in adapter_config.json to the rank it was trained with",
            path=where,
        )
    n = rows // r
    if param == "weight" and n == 1:  # a 2-D parameter (a router): an ordinary LoRA of its module
        _check_finite(a, a_key, where, lambda i: f"rank row {i[0]}")
        _check_finite(b, b_key, where, lambda i: f"rank column {i[1]}")
        return {host: LoraModule(down=a, up=b, alpha=alpha, use_rslora=rslora)}
    if counted is not None and n != counted[0]:
        raise ShapeError(
            f"{where}: {a_key} has {rows} rows = {n} experts x rank {r}, but the base's config.json says "
            f"{counted[0]} experts ({counted[1]}); r / rank_pattern in adapter_config.json, or the base's "
            "config.json, is wrong",
            hint="merge into the base the adapter was trained on, check rank_pattern for " + path + ", and check "
            f"that the base's expert tensors hold {counted[1]} = {counted[0]} experts",
            path=where,
        )
    if param == "weight":
        raise UnsupportedError(
            f"{where}: {a_key} has {rows} rows = {n} x rank {r}, so parameter {path} would be a stack of {n} "
            "experts; loratools reads a wrapped 'weight' as one 2-D matrix only",
            path=where,
        )
    if packing is None and r > 1:
        raise UnsupportedError(
            f"{where.parent / CONFIG}: {b_key} packs {n} experts x rank {r} in its columns, and nothing says in "
            "which order: PEFT's ParamWrapper interleaves them (expert e in columns k*E+e), other exporters "
            "write them blocked (expert e in columns e*r..e*r+r-1); the file names no peft_version and no "
            f"{PACKING_KEY}",
            hint='add "expert_lora_b_layout": "interleaved" (what PEFT writes) or "blocked" to adapter_config.json',
            path=where.parent / CONFIG,
        )
    blocked = packing == "blocked"
    _check_finite(a, a_key, where, lambda i: f"expert {i[0] // r} of {path}")
    _check_finite(b, b_key, where, lambda i: f"expert {i[1] // r if blocked else i[1] % n} of {path}")
    known = model in TRANSPOSED_MODEL_TYPES or model in STRAIGHT_MODEL_TYPES
    out: dict[str, LoraModule] = {}
    for e in range(n):
        out[expert_key(path, e)] = ExpertLoraModule(
            down=a[e * r : (e + 1) * r],
            up=b[:, e * r : (e + 1) * r] if blocked else b[:, e::n],
            alpha=alpha,
            use_rslora=rslora,
            fan_in_fan_out=model in TRANSPOSED_MODEL_TYPES,
            parameter=path,
            expert=e,
            num_experts=n,
            orientation_known=known,
        )
    return out
