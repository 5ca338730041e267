"""``info``: what an adapter holds, as one JSON-ready dict (the CLI renders it; docs/json.md documents it)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

#: the component prefix of a kohya/LyCORIS module name (formats/kohya/format.py's names)
_KOHYA_PREFIX = re.compile(r"^(lora_[a-z0-9]+_|lycoris_)")

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter, LoraModule


def module_record(name: str, m: LoraModule) -> dict[str, Any]:
    """One entry of ``modules``: name, kind, rank, alpha, scale and sizes in the base's terms."""
    if not hasattr(m, "down"):
        return _family_record(name, m)
    rec: dict[str, Any] = {
        "family": "lora",
        "name": name,
        "kind": m.kind,
        "rank": m.rank,
        "alpha": _num(m.alpha),
        "scale": m.scale,
        "in_features": m.in_features,
        "out_features": m.out_features,
    }
    if m.kind == "embedding":
        rec["num_embeddings"] = m.in_features
        rec["embedding_dim"] = m.out_features
    if m.kind == "conv":
        rec["in_channels"] = int(m.down.shape[1])
        rec["kernel_size"] = [int(s) for s in m.down.shape[2:]]
    rec["dora"] = m.magnitude is not None
    rec["bias"] = m.bias is not None
    rec["fan_in_fan_out"] = m.fan_in_fan_out
    rec["dtype"] = _dtype(m.down.dtype)
    if hasattr(m, "num_experts"):  # one expert's slice of a stacked expert parameter (model/experts.py)
        rec.update(parameter=m.parameter, expert=m.expert, num_experts=m.num_experts)
    return rec


def _dit(dit: dict[str, Any] | None) -> dict[str, Any] | None:
    """The diffusion-transformer family and layout a reader found, with the family's name as users write it."""
    if not dit:
        return dit
    from loratools.formats.dit.layouts import LABELS

    return {**dit, "label": LABELS.get(dit["family"], dit["family"])}


def _family_record(name: str, m: Any) -> dict[str, Any]:
    """A LoHa/LoKr/OFT/BOFT/IA3 module: the LoRA fields that apply, and the family's own facts."""
    tensors = m.tensors()
    return {
        "name": name,
        "family": m.family,
        "kind": m.kind,
        "rank": m.rank,
        "alpha": _num(m.alpha) if m.alpha is not None else None,
        "scale": m.scale,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "dora": m.magnitude is not None,
        "bias": False,
        "fan_in_fan_out": bool(getattr(m, "fan_in_fan_out", False)),
        "dtype": _dtype(next(iter(tensors.values())).dtype),
        "needs_base": m.needs_base,
        "exact_lora_rank": m.max_rank if m.is_low_rank else None,
        "details": m.describe(),
    }


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _one(values: set[Any]) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def size_on_disk(adapter: Adapter, path: Path) -> int:
    """Bytes of the adapter's own files (the format's file list, else everything at ``path``)."""
    files = [Path(f) for f in adapter.meta.get("files") or []]
    if not files:
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file())


def base_parameters(reader: CheckpointReader) -> int:
    """Parameters of a base checkpoint, from tensor headers only."""
    return sum(math.prod(reader.info(k).shape) for k in reader.keys())


def target_names(names: Any) -> list[str]:
    """The distinct targets of ``names``: the last path component (two when it is an index, ``to_out.0``);
    for kohya names (no dots) the part after the last block index (``attn1_to_q``), so an SDXL file's
    hundreds of modules read as a dozen targets."""
    found = set()
    for name in names:
        name = re.sub(r"\[\d+\]$", "", name)  # one expert of a stacked parameter: the parameter is the target
        if "." in name:
            parts = name.split(".")
            found.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
        else:  # lora_unet_conv_in -> conv_in: the prefix names the component, not the target
            found.add(re.split(r"_\d+_(?=[A-Za-z])", _KOHYA_PREFIX.sub("", name))[-1])
    return sorted(found)


def _layout_unknown(adapter: Adapter, name: str, m: Any) -> bool:
    """A LyCORIS LoHa/LoKr module whose file cannot say linear or conv: LyCORIS stores a conv's factors
    flattened to (r, in·kh·kw), as a linear's (Tucker and full-w2 LoKr convs keep 4-D tensors). Text
    encoders hold no convs."""
    if adapter.format != "kohya" or getattr(m, "family", "lora") not in ("loha", "lokr") or m.kind != "linear":
        return False
    if m.family == "lokr" and (m.w2 is not None or m.t2 is not None):
        return False  # a full lokr_w2 is 4-D for a conv, so a 2-D one is a linear
    source = (adapter.meta.get("kohya_names") or {}).get(name, name)
    return not source.startswith("lora_te")


def _notes(adapter: Adapter, records: list[dict[str, Any]]) -> list[str]:
    """What the numbers shown rest on that the file does not say."""
    notes = []
    scaled = {n for n, m in adapter.modules.items() if getattr(m, "family", "lora") in ("lora", "loha", "lokr")}
    assumed = [n for n in adapter.meta.get("alpha_assumed") or [] if n in scaled]
    if assumed:
        total = len(adapter.modules)
        share = f"{len(assumed)} of {total} modules store none" if len(assumed) < total else "no module stores an alpha"
        notes.append(f"alpha assumed: {share}; {adapter.format} takes alpha = rank (scale 1), as shown")
    zero = adapter.meta.get("alpha_zero")
    if zero:  # formats/alpha_values.py: an .alpha of 0 is read as alpha = rank, and said
        notes.append(
            f"alpha 0 read as alpha = rank: {zero['modules']} of {zero['of']} modules store .alpha = 0; sd-scripts' "
            "rule takes that as alpha = rank (scale 1), as shown (ComfyUI applies them at scale 0)"
        )
    if any(r["kind"] is None for r in records):
        unknown = sum(1 for r in records if r["kind"] is None)
        notes.append(
            f"{unknown} LyCORIS module(s) store their factors flattened: linear or conv is not known without "
            "--base (kind ?; a conv's in is in_channels·kh·kw)"
        )
    return notes


def summarize(adapter: Adapter) -> dict[str, Any]:
    """The format-independent summary of an in-memory adapter (everything but disk and base facts).

    ``parameters`` counts what was trained: factors, magnitudes, biases and full replacements, but not
    the base layers PEFT saves beside an adapted embedding or tied head (``saved_base_layers``).
    """
    from loratools.model.tied import base_layer_copies

    mods = adapter.modules
    copies = base_layer_copies(adapter)
    tokens = adapter.meta.get("trainable_tokens") or {}  # PEFT trainable_token_indices (loratools/tokens.py)
    scales = {round(m.scale, 12) if m.scale is not None else None for m in mods.values()}
    dtypes = sorted({_dtype(d) for d in adapter.dtypes()})
    cfg = adapter.meta.get("config") or {}
    metadata = {k: v for k, v in (adapter.meta.get("metadata") or {}).items() if k != "loratools"}
    from loratools.model.alora import invocation_tokens
    from loratools.model.experts import expert_summary

    records = [module_record(n, m) for n, m in sorted(mods.items())]
    for r in records:
        if _layout_unknown(adapter, r["name"], mods[r["name"]]):
            r["kind"] = None
    return {
        "format": adapter.format,
        "base_model": adapter.base_model,
        "num_modules": len(mods),
        "rank": _one(adapter.ranks()),
        "ranks": sorted(adapter.ranks()),
        "alpha": _num(a) if (a := _one(adapter.alphas())) is not None else None,
        "alphas": sorted(_num(a) for a in adapter.alphas()),
        "scale": next(iter(mods.values())).scale if len(scales) == 1 else None,
        "use_rslora": any(m.use_rslora for m in mods.values()),
        "families": sorted(adapter.families()),
        "use_dora": any(m.magnitude is not None for m in mods.values()),
        "lora_bias": any(m.bias is not None for m in mods.values()),
        "kinds": sorted({r["kind"] for r in records if r["kind"] is not None}),
        "target_modules": target_names(mods),
        "task_type": cfg.get("task_type"),
        "alora_invocation_tokens": invocation_tokens(adapter),
        "parameters": adapter.parameters
        - sum(int(adapter.replacements[k].numel()) for k in copies)
        + sum(int(t["values"].numel()) for t in tokens.values()),
        "trainable_tokens": {name: t["indices"] for name, t in sorted(tokens.items())},
        "saved_base_layers": copies,
        "dtype": dtypes[0] if len(dtypes) == 1 else None,
        "dtypes": dtypes,
        "replacements": [
            {"name": k, "shape": list(t.shape), "dtype": _dtype(t.dtype)}
            for k, t in sorted(adapter.replacements.items())
        ],
        "metadata": metadata,
        "provenance": adapter.meta.get("provenance"),
        "experts": expert_summary(adapter),
        "alpha_assumed": sorted(n for n in adapter.meta.get("alpha_assumed") or [] if n in mods),
        "alpha_zero": adapter.meta.get("alpha_zero"),
        "dit": _dit(adapter.meta.get("dit")),
        "notes": _notes(adapter, records),
        "modules": records,
    }


def info(adapter_path: str | Path, base: str | Path | None = None, *, format: str | None = None) -> dict[str, Any]:
    """Describe the adapter at ``adapter_path`` (any registered format) as a JSON-ready dict.

    With ``base``, module names are normalized to the base's tensor names and the dict gains
    ``base_parameters`` and ``parameter_share`` (adapter parameters / base parameters).

    Example::

        >>> from loratools import info
        >>> d = info("fixtures/peft/llama-lora")
        >>> d["rank"], d["alpha"], d["num_modules"]
        (4, 7, 8)
    """
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.errors import FormatError
    from loratools.model.tied import tied_source
    from loratools.ops.validate.streamed import load_streamed
    from loratools.publishing.hub import resolve_path

    local = resolve_path(adapter_path, "adapter")
    if base is not None:
        require_model(base, f"loratools info {adapter_path}")
    from loratools.formats.adapter_io import is_llamacpp_gguf

    gguf_base = base is not None and is_llamacpp_gguf(base)  # a llama.cpp model: its tensor table is the base
    reader = open_checkpoint(base) if base is not None and not gguf_base else None
    try:
        try:
            adapter = load_streamed(local, format=format, base=reader)  # huge tensors: header facts only
        except FormatError as exc:  # a base model or a merge output: say what it is (ops/info_base.py)
            from loratools.ops.info_base import not_an_adapter

            return not_an_adapter(Path(local), adapter_path, exc)
        data: dict[str, Any] = {"path": str(adapter_path)}
        data.update(summarize(adapter))
        data["size_on_disk"] = size_on_disk(adapter, local)
        data["base"] = None
        data["base_parameters"] = None
        data["parameter_share"] = None
        if reader is not None:
            total = base_parameters(reader)
            data["base"] = str(base)
            data["base_parameters"] = total
            data["parameter_share"] = data["parameters"] / total if total else None
            if reader.quant is not None:  # scheme, bits, block sizes and the quantized tensors
                data["base_quantization"] = reader.quant.summary()
            unresolved = adapter.meta.get("unresolved") or []
            data["unresolved"] = [n for n in unresolved if tied_source(reader, n) is None]
            _kinds_from_base(data, reader)
        if gguf_base:
            from loratools.formats.gguf.names import load_base

            total = sum(math.prod(shape) for shape, _ in (load_base(base).tensors or {}).values())
            data["base"] = str(base)
            data["base_parameters"] = total
            data["parameter_share"] = data["parameters"] / total if total else None
        # the modules list reads best last
        data["modules"] = data.pop("modules")
        return data
    finally:
        if reader is not None:
            reader.close()


def _kinds_from_base(data: dict[str, Any], reader: CheckpointReader) -> None:
    """A module's layer kind from its base weight: 4-D is a conv (a LyCORIS LoHa/LoKr file stores a conv's
    factors flattened, so only the base tells), 2-D a linear; embeddings stay embeddings."""
    from loratools.checkpoint.keymap import KeyMatcher

    matcher = KeyMatcher(reader.keys())
    for rec in data["modules"]:
        key = matcher.tensor_key(rec["name"]) if rec["kind"] != "embedding" else None
        shape = tuple(reader.info(key).shape) if key is not None else ()
        if len(shape) == 4 and rec["kind"] != "conv":
            rec["kind"], rec["in_channels"], rec["kernel_size"] = "conv", int(shape[1]), [int(k) for k in shape[2:]]
        elif len(shape) == 2 and rec["kind"] is None:
            rec["kind"] = "linear"
    data["kinds"] = sorted({r["kind"] for r in data["modules"] if r["kind"] is not None})
    if not any(r["kind"] is None for r in data["modules"]):
        data["notes"] = [n for n in data["notes"] if "stored flattened" not in n and "factors flattened" not in n]


def require_model(base: str | Path, usage: str) -> None:
    """A UsageError when ``--base`` names an adapter rather than the model an adapter is for; ``usage``
    is the command line the hint suggests (``loratools info ADAPTER``)."""
    from loratools.errors import LoratoolsError, UsageError
    from loratools.formats.registry import detect_format
    from loratools.publishing.hub import resolve_path

    local = Path(resolve_path(base, "base checkpoint"))
    if local.is_dir() and ((local / "config.json").is_file() or (local / "model_index.json").is_file()):
        return
    try:
        fmt = detect_format(local)
    except LoratoolsError:
        return
    raise UsageError(
        f"--base {base} is an adapter ({fmt.name}), not a base model",
        hint=f"pass the model the adapter was trained on: {usage} --base MODEL",
    )
