"""``merge --expand-base``: a Flux control LoRA (FLUX.1 Canny/Depth "-lora" files, or a diffusers-trained one)
whose ``img_in``/``x_embedder`` takes the latent and the control image's latent side by side (128 inputs where
FLUX.1-dev's take 64), merged into a plain base whose input layer is widened first.

What diffusers does in memory (``FluxLoraLoaderMixin._maybe_expand_transformer_param_shape_or_error_``): the base
weight gets zero columns for the new inputs (the bias is unchanged: the outputs are), then the LoRA is applied.
Here the plan does it: the widened base weight is the job's starting tensor, the update is added to it and the
wider tensor written in the base's dtype. The written config says so, unlike diffusers' own ``save_pretrained``
after a widening (it keeps ``in_channels`` at the old width, and the folder no longer loads): a transformer's
``config.json`` gets ``in_channels`` = the new width and ``out_channels`` = the old one (FluxTransformer2DModel's
``out_channels`` defaults to ``in_channels``: the output stays a plain latent); a pipeline's ``model_index.json``
names the control pipeline (``FluxControlPipeline``), which feeds the control latent. A single file has no config:
ComfyUI reads the input width from the weight itself (``comfy/model_detection.py``: Flux ``in_channels`` =
``img_in.weight.shape[1] // 4``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.formats.dit.bfl_control import INPUT_LAYERS, expansion, width_problem

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader

#: a plan.TensorJob (not imported: plan imports this module)
TensorJob = Any

#: the plain Flux pipelines -> the control pipeline of the same task (diffusers' pipelines/flux/)
CONTROL_PIPELINES = {
    "FluxPipeline": "FluxControlPipeline",
    "FluxImg2ImgPipeline": "FluxControlImg2ImgPipeline",
    "FluxInpaintPipeline": "FluxControlInpaintPipeline",
}
#: components of a FluxPipeline the control pipelines do not take
_NOT_CONTROL = ("image_encoder", "feature_extractor")


def _wants(j: TensorJob, rows: int) -> set[int]:
    """The input widths the job's plain LoRA contributions (and full replacement) give ``j``'s tensor."""
    out = {
        int(c.lora.weight_shape[1])
        for c in j.deltas
        if hasattr(c.lora, "factors") and c.rows is None and c.expert is None and not c.lora.transposed
        and len(c.lora.weight_shape) == 2 and int(c.lora.weight_shape[0]) == rows
    }  # fmt: skip
    r = j.replacement
    if r is not None and r.ndim == 2 and int(r.shape[0]) == rows:
        out.add(int(r.shape[1]))
    return out


def widen_jobs(jobs: dict[str, TensorJob], reader: CheckpointReader) -> dict[str, tuple[int, int]]:
    """With ``--expand-base`` on: every input-layer job (``INPUT_LAYERS``) whose adapters take more inputs than its
    base tensor starts from the base weight with zero columns appended; returns base key -> (old, new) inputs (and
    records it for the merge's note). Off: nothing."""
    record = expansion()
    if record is None:
        return {}
    out: dict[str, tuple[int, int]] = {}
    for key, j in jobs.items():
        if j.source != key or not key.endswith(INPUT_LAYERS):
            continue
        shape = tuple(reader.info(key).shape)
        if len(shape) != 2:
            continue
        rows, have = int(shape[0]), int(shape[1])
        wants = _wants(j, rows) - {have}
        if not wants:
            continue
        if len(wants) > 1 or width_problem(have, max(wants)) is not None:
            continue  # refused by the plan's shape check, in one line naming the file (and why: widen_advice)
        want = wants.pop()
        if j.replacement is None:
            import torch

            base = reader.get(key)
            wide = torch.zeros((rows, want), dtype=base.dtype)
            wide[:, :have] = base
            j.replacement = wide
        j.widened = (have, want)
        out[key] = (have, want)
    record.update(out)
    return out


def widen_advice(key: str, want: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """The clause a shape refusal of an input layer adds: merge with ``--expand-base`` where it would widen the base
    tensor, or why it cannot (else "")."""
    other = len(want) == 2 and len(shape) == 2 and want[0] == shape[0] and want[1] != shape[1]
    if not key.endswith(INPUT_LAYERS) or not other:
        return ""
    problem = width_problem(shape[1], want[1])
    if problem is not None:
        return f" (--expand-base cannot widen it: the adapter {problem})" if expansion() is not None else ""
    if expansion() is not None:
        return ""
    return ("; a control LoRA (Canny/Depth) feeds it the control image's latent as well: merge with --expand-base "
            "to widen it with zero columns")  # fmt: skip


def widen_config(dst: Path, rel: str, plan: Any) -> None:
    """Rewrite the copied ``dst`` (``rel`` in the output) if it is the config of a widened transformer (``in_channels``
    the new width, ``out_channels`` the old) or the model_index.json of a pipeline holding one (the control class)."""
    widened = getattr(plan, "widened", None) or {}
    for key, (old, new) in widened.items():
        if not key.endswith("x_embedder.weight"):
            continue
        component = key[: -len("x_embedder.weight")].rstrip(".")
        if rel == (f"{component}/config.json" if component else "config.json"):
            cfg = json.loads(dst.read_text(encoding="utf-8"))
            if cfg.get("in_channels") == old:
                cfg["out_channels"] = cfg.get("out_channels") or old
                cfg["in_channels"] = new
                dst.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        elif component and rel == "model_index.json":
            index = json.loads(dst.read_text(encoding="utf-8"))
            control = CONTROL_PIPELINES.get(index.get("_class_name"))
            if control is not None:
                index["_class_name"] = control
                index = {k: v for k, v in index.items() if k not in _NOT_CONTROL}
                dst.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def widen_notes(widened: dict[str, tuple[int, int]], single: bool) -> list[str]:
    """One line per widened tensor for the merge summary (or the one line saying none needed it)."""
    if not widened:
        return ["--expand-base: no input layer needed widening (every adapter takes the base's own input width); "
                "the output is the plain merge"]  # fmt: skip
    where = "the weight's own shape tells ComfyUI" if single else "config in_channels/out_channels written"
    return [f"--expand-base: widened {key} from {old} to {new} inputs (zero columns for the control input; {where})"
            for key, (old, new) in sorted(widened.items())]  # fmt: skip


__all__ = ["CONTROL_PIPELINES", "widen_advice", "widen_config", "widen_jobs", "widen_notes"]
