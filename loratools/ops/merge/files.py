"""What else of a base folder belongs to a merged output: tokenizer, configs, cards, templates — copied
as they are (config.json patched) — and what does not: weight files and exports of the base that the merge
did not rewrite (``pytorch_model.bin`` beside safetensors, ``original/consolidated.00.pth``, ``onnx/``,
GGUF files ...). Copying those unmerged would let a loader that prefers them silently run the base."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loratools.ops.merge.layout import Unit

_SKIP_DIRS = {".git", ".cache", "__pycache__"}
#: suffixes of files that hold model weights (or a whole exported model) in some framework
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data",
    ".tflite", ".mlmodel", ".pb", ".engine", ".plan", ".nemo", ".npz",
)
#: folders that hold another export of the whole model (never rewritten by a merge)
EXPORT_DIRS = ("onnx", "openvino", "coreml", "tflite", "original", "gguf", "mlx")


def _is_weight_file(name: str) -> bool:
    if name == "training_args.bin":  # the Trainer's arguments, not weights
        return False
    if name.endswith(".index.json"):
        return any(k in name for k in ("safetensors", "pytorch_model", "tf_model", "flax_model", "model."))
    return name.endswith(WEIGHT_SUFFIXES)


def other_files(base: Path, units: list[Unit]) -> tuple[list[tuple[str, Path]], list[str]]:
    """The files of the base folder to copy beside the merged weights, and the stale ones left out.

    Left out (relative paths returned): weight files and model exports inside a folder whose weights the
    merge rewrote — they still hold the base's unmerged weights. Components of a pipeline that no
    adapter touches are copied whole (their weights are unchanged).
    """
    from loratools.ops.merge.layout import INDEX_NAMES

    consumed = {p.resolve() for u in units for p in u.consumed}
    rewritten_dirs = {(base / u.subdir).resolve() for u in units}
    found: list[tuple[str, Path]] = []
    stale: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and ".loratools-" not in d)
        here = Path(dirpath).resolve()
        inside = next((d for d in rewritten_dirs if here == d or d in here.parents), None)
        in_export = inside is not None and any(p in EXPORT_DIRS for p in here.relative_to(inside).parts)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.resolve() in consumed or ".loratools-" in name:
                continue
            if name in INDEX_NAMES and here in rewritten_dirs:
                continue
            rel = p.relative_to(base).as_posix()
            if inside is not None and (in_export or _is_weight_file(name)):
                stale.append(rel)
                continue
            found.append((rel, p))
    return found, sorted(stale)


def copy_other_files(base: Path, tmp: Path, units: list[Unit], plan, out_dtype, dequantized: bool = False) -> int:  # noqa: ANN001
    """Copy :func:`other_files`; ``dequantized``: the weights were written dequantized (16-bit)."""
    written = 0
    for rel, src in other_files(base, units)[0]:
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == "config.json" and (plan.untied or plan.vocab_size or out_dtype or dequantized):
            dst.write_text(patched_config(src, plan, out_dtype, dequantized), encoding="utf-8")
        else:
            shutil.copyfile(src, dst)
        if getattr(plan, "widened", None):  # merge --expand-base: in_channels, the control pipeline class
            from loratools.ops.merge.widen import widen_config

            widen_config(dst, rel, plan)
        written += dst.stat().st_size
    return written


def patched_config(path: Path, plan, out_dtype, dequantized: bool = False) -> str:  # noqa: ANN001
    """config.json with tied embeddings untied, a resized vocabulary, the new dtype recorded and, for a
    dequantized base, ``quantization_config`` removed (loaders would expect packed weights)."""
    from loratools.checkpoint.reader import read_json
    from loratools.model.tied import untie_config

    cfg = read_json(path, "config")
    if dequantized:
        cfg.pop("quantization_config", None)
        if isinstance(cfg.get("quantization"), dict):  # MLX names it "quantization" too (mlx-lm writes both)
            cfg.pop("quantization")
    targets = [cfg] + [cfg[k] for k in ("text_config",) if isinstance(cfg.get(k), dict)]
    for c in targets:
        if plan.untied and c.get("tie_word_embeddings", c is cfg):
            untie_config(c, any(j.scale != 1 for j in plan.jobs.values()))
        if plan.vocab_size and "vocab_size" in c:
            c["vocab_size"] = plan.vocab_size
        if out_dtype:
            name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[out_dtype]
            for key in ("dtype", "torch_dtype"):
                if key in c:
                    c[key] = name
    return json.dumps(cfg, indent=2) + "\n"
