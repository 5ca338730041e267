"""``validate``: every problem of an adapter (and of it against a base), as findings naming the module.

Input that cannot be read at all is itself reported (``usable`` False, exit code 2); an adapter that
reads but disagrees with itself or its base gives error findings (exit code 1). Warnings never fail.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import LoratoolsError, UnsupportedError, UsageError, ValidationError
from loratools.ops.validate.findings import ValidationReport

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter


def validate(
    adapter_path: str | Path,
    base: str | Path | None = None,
    target: str | None = None,
    scan: bool = False,
    reference: str | Path | None = None,
    allow_other_base: bool = False,
) -> ValidationReport:
    """Check the adapter at ``adapter_path`` (and, with ``base``, against a base checkpoint).

    Never raises for bad input: unreadable files become findings with ``usable`` False. ``target``
    (a serving runtime) adds the findings of :func:`loratools.ops.serving.serving_findings`; ``scan``
    adds the anomaly scan of :func:`loratools.ops.scan.scan_adapter` (warnings, figures in ``report.scan``).
    A quantized ``base`` is described in ``report.quantized_base``; ``reference`` (its 16-bit original)
    adds per-module ‖W16 − deq(Wq)‖ / ‖ΔW‖ (:mod:`loratools.ops.validate.quantized`). An adapter that says
    it was trained on another model than ``base`` is an error (``base_mismatch``; a warning with
    ``allow_other_base``), by the rule merge and combine apply (:mod:`loratools.ops.base_match`).

    Example::

        >>> from loratools import validate
        >>> report = validate("fixtures/peft/llama-lora", base="fixtures/bases/llama")
        >>> report.ok, [f.code for f in report.findings]
        (True, [])
    """
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.formats.registry import detect_format
    from loratools.publishing.hub import resolve_path

    if allow_other_base and base is None:  # an option is never ignored
        raise UsageError(
            "--allow-other-base says the adapter may be used on another base than it names; it needs --base BASE",
            hint="pass the base with --base BASE, or leave --allow-other-base out",
        )
    report = ValidationReport(path=str(adapter_path), base=str(base) if base is not None else None)
    try:
        local = resolve_path(adapter_path, "adapter")
        fmt = detect_format(local)
    except LoratoolsError as exc:
        return report.unusable(exc, "unreadable")
    report.format = fmt.name
    structural = getattr(fmt, "structural_findings", None)
    if structural is not None:
        try:
            problems = structural(local)
        except UnsupportedError as exc:
            return report.unusable(exc, "unsupported_type")
        except LoratoolsError as exc:
            return report.unusable(exc, "unreadable")
        for module, code, message, tensor in problems:
            report.add("error", module, code, message, tensor=tensor)
        if problems:  # the adapter cannot be built; still name every NaN/Inf in its files
            for f in _weight_files(local):
                for key, t in _file_tensors(f):
                    _report_nonfinite(t, key, f, _module_of(key, None, fmt.name), report)
            return report
    reader = None
    from loratools.formats.adapter_io import is_llamacpp_gguf

    llamacpp_base = base is not None and is_llamacpp_gguf(base)  # a GGUF diffusion model: a single file
    if llamacpp_base:  # a GGUF model's header is checked whatever the target
        from loratools.formats.gguf.names import load_base

        try:
            load_base(base)
        except LoratoolsError as exc:
            return report.unusable(exc, "base_unreadable")
    onnx_base = base is not None and target == "onnxruntime-genai" and _is_onnx_model(base)
    if base is not None and not llamacpp_base and not onnx_base:  # a GGUF model: a base for GGUF targets
        try:
            reader = open_checkpoint(base)
        except LoratoolsError as exc:
            return report.unusable(exc, "base_unreadable")
    try:
        try:
            # a GGUF model base serves GGUF adapters (their names and Q/K rows need its head counts)
            from loratools.ops.validate.streamed import read_streamed

            # huge tensors stay in the file (checked in chunks below); --scan needs every value
            read_base = reader if reader is not None or fmt.name != "gguf" else base
            adapter = fmt.read(local, base=read_base) if scan else read_streamed(fmt, local, read_base)
        except UnsupportedError as exc:
            return report.unusable(exc, "unsupported_type")
        except ValidationError as exc:
            report.add("error", None, "invalid", exc.message, hint=exc.hint)
            return report
        except LoratoolsError as exc:
            return report.unusable(exc, "unreadable")
        report.modules_checked = len(adapter.modules)
        report.format = adapter.format or report.format  # a DiT file's layout (comfyui, ...), as info names it
        check_adapter(adapter, report)
        check_finite(adapter, report)
        if reader is not None:
            from loratools.ops.validate.base import check_against_base, check_claimed_base

            check_claimed_base(adapter, reader, base, report, allow_other_base)
            check_against_base(adapter, reader, report)
            if reader.quant is not None or reference is not None:
                from loratools.ops.validate.quantized import check_quantized_base

                check_quantized_base(adapter, reader, reference, report)
        if target is not None:
            from loratools.ops.validate.serving import serving_findings

            report.findings += serving_findings(
                adapter, target, base_kind=reader.kind if reader else None, base=None if onnx_base else base
            )
        if onnx_base:  # the model's LoRA inputs: names, sizes, dtype and rank, as convert --for checks them
            from loratools.onnx.slot_map import slot_feeds

            report.findings = [f for f in report.findings if f.code != "onnxruntime-genai.targets_fixed"]  # checked
            try:
                slot_feeds(adapter, base)
            except LoratoolsError as exc:
                report.add("error", None, "onnxruntime-genai.lora_inputs", exc.message, hint=exc.hint)
        if scan:
            from loratools.ops.scan import scan_adapter, scan_findings

            lora_only = {n: m for n, m in adapter.modules.items() if hasattr(m, "factors")}  # factor-space scan
            result = scan_adapter(type(adapter)(lora_only, adapter.replacements, adapter.meta))
            report.scan = result.to_dict()
            known = {(f.module, f.code) for f in report.findings}
            for module, code, message in scan_findings(result):
                if code != "scan_rank_declared" or (module, "config_rank") not in known:
                    report.add("warning", module, code, message)
    finally:
        if reader is not None:
            reader.close()
    return report


# -- the adapter on its own ----------------------------------------------------------------------
def check_adapter(adapter: Adapter, report: ValidationReport) -> None:
    """Dtypes, config agreement (ranks, targets, patterns, modules_to_save), empty and no-op modules."""
    from loratools.ops.validate.streamed import all_zero

    if not adapter.modules and not adapter.replacements:
        report.add("error", None, "empty", f"{report.path}: the adapter has no LoRA modules and no full tensors")
    for name, m in sorted(adapter.modules.items()):
        if not hasattr(m, "down"):  # LoHa, LoKr, OFT, BOFT, IA3, diag-OFT
            from loratools.ops.validate.families import check_family_module

            check_family_module(adapter, name, m, report)
            continue
        for role, t in (("lora_A", m.down), ("lora_B", m.up), ("magnitude", m.magnitude), ("bias", m.bias)):
            if t is not None and not t.is_floating_point():
                report.add(
                    "error", name, "dtype", f"module {name}: {role} is {_dt(t)}; LoRA tensors must be floating point"
                )
        if m.rank > min(m.out_features, m.in_features):
            files = [f for f in adapter.meta.get("files") or [] if not str(f).endswith(".json")]
            report.add(
                "error",
                name,
                "rank_exceeds_matrix",
                f"{files[0] if files else report.path}: module {name}: rank {m.rank} exceeds its "
                f"{m.out_features}x{m.in_features} matrix (lora_A {list(m.down.shape)}, lora_B {list(m.up.shape)})",
                hint=f"resize it: loratools resize ADAPTER --max-rank {min(m.out_features, m.in_features)} -o OUT",
                file=str(files[0]) if files else None,
                tensor=f"{name}.lora_A",
            )
        if m.alpha == 0:
            report.add("warning", name, "zero_scale", f"module {name}: alpha is 0, so the module changes nothing")
        elif m.alpha < 0:
            from loratools.ops.validate.families import warn_negative_alpha

            warn_negative_alpha(report, name, m.alpha)
        elif m.up.is_floating_point() and all_zero(m.up, adapter):
            report.add(
                "warning",
                name,
                "zero_delta",
                f"module {name}: lora_B is all zeros, so the module changes nothing (an untrained adapter?)",
            )
    from loratools.model.alora import invocation_tokens

    if tokens := invocation_tokens(adapter):
        report.add(
            "warning",
            None,
            "alora",
            f"{report.path}: activated LoRA (aLoRA): it acts only from its invocation tokens {tokens} on; "
            "a runtime without aLoRA support, or a merge, applies it to every token",
            hint="merge refuses it; to merge anyway (every token): loratools merge BASE ADAPTER -o OUT --allow-alora",
        )
    cfg = adapter.meta.get("config")
    if adapter.format == "peft" and isinstance(cfg, dict):
        _check_peft_config(adapter, cfg, report)


def _check_peft_config(adapter: Adapter, cfg: dict[str, Any], report: ValidationReport) -> None:
    from loratools.model.ambiguity import TRUST_HINT, ambiguities

    for amb in ambiguities(adapter):
        report.add("error", amb.module, "config_rank", amb.message(), hint=TRUST_HINT)
    targets = cfg.get("target_modules")
    if targets and targets != "all-linear" and not cfg.get("layers_to_transform"):
        wrapped = [t.rpartition(".")[0] for t in cfg.get("target_parameters") or [] if isinstance(t, str)]
        for name in sorted(adapter.modules):
            param = getattr(adapter.modules[name], "parameter", name)  # an expert slice: its parameter's module
            host = param.rpartition(".")[0] if param != name else name
            if any(host == w or host.endswith("." + w) for w in wrapped):
                continue  # a target_parameters wrapper (formats/peft/experts.py), not a target_modules match
            if not _targeted(name, targets):
                report.add(
                    "warning",
                    name,
                    "not_targeted",
                    f"module {name} is not matched by target_modules {targets!r}; PEFT will ignore its tensors",
                )
    names = [getattr(m, "parameter", n) for n, m in adapter.modules.items()]  # expert slices: their parameter
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in cfg.get(key) or {}:
            if not any(re.match(rf"(.*\.)?({pattern})$", n) for n in names):
                report.add("warning", None, "unused_pattern", f"{key} entry {pattern!r} matches no module")
    saved = {k.rpartition(".")[0] for k in adapter.replacements}
    for mod in cfg.get("modules_to_save") or []:
        if not any(s == mod or s.endswith("." + mod) for s in saved):
            report.add(
                "warning", mod, "missing_replacement", f"modules_to_save lists {mod} but the file has no tensor for it"
            )


def _targeted(name: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches a name or a dotted suffix."""
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, name) is not None
        except re.error:
            return True
    return any(name == t or name.endswith("." + t) for t in targets)


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_finite(adapter: Adapter, report: ValidationReport) -> None:
    """NaN/Inf in any tensor, named by file, tensor and first bad index (streamed, one tensor at a time)."""
    files = [Path(f) for f in adapter.meta.get("files") or [] if str(f).endswith((".safetensors", ".bin"))]
    if files:
        for f in files:
            for key, t in _file_tensors(f):
                _report_nonfinite(t, key, f, _module_of(key, adapter, adapter.format), report)
        return
    from loratools.model.adapter import module_tensors

    for name, m in adapter.modules.items():
        for role, t in module_tensors(m).items():
            _report_nonfinite(t, f"{name} ({role})", None, name, report)
    for key, t in adapter.replacements.items():
        _report_nonfinite(t, key, None, key.rpartition(".")[0], report)


def _file_tensors(path: Path):  # noqa: ANN202 - yields (name, tensor)
    if path.suffix == ".safetensors":
        from loratools.files.safetensors_file import SafetensorsFile
        from loratools.files.tensor_scan import scan_tensor
        from loratools.ops.validate.streamed import LAZY_MIN_BYTES

        f = SafetensorsFile(path)
        try:
            for key in f.keys():
                info = f.info(key)
                if info.is_float:  # a huge tensor is scanned in chunks, not loaded
                    yield key, (scan_tensor(path, info) if info.nbytes >= LAZY_MIN_BYTES else f.get(key))
        finally:
            f.close()
    else:
        from loratools.files.pickle_file import load_pickle_weights

        yield from load_pickle_weights(path).items()


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix in (".safetensors", ".bin") else []
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


def _module_of(key: str, adapter: Adapter | None, format: str | None) -> str | None:
    if format == "peft":
        from loratools.formats.peft.format import split_key

        return split_key(key)[0]
    names = adapter.modules if adapter is not None else []
    hits = [n for n in names if n in key or n.replace(".", "_") in key]
    return max(hits, key=len) if hits else None


def _report_nonfinite(
    t: torch.Tensor, tensor: str, file: Path | None, module: str | None, report: ValidationReport
) -> None:
    import torch

    from loratools.files.tensor_scan import TensorScan

    if isinstance(t, TensorScan):  # a huge tensor, scanned in chunks
        if t.first_nonfinite is None:
            return
        count, value, first = t.nonfinite, t.value, t.index()
    else:
        if not t.is_floating_point() or t.numel() == 0:
            return
        x = t if t.element_size() > 1 else t.float()  # isfinite has no fp8 kernels
        bad = ~torch.isfinite(x)
        if not bool(bad.any()):
            return
        first = [int(i) for i in bad.nonzero()[0].tolist()]
        count, value = int(bad.sum()), float(x[tuple(first)])
    where = f"{file}: " if file is not None else ""
    report.add(
        "error",
        module,
        "nonfinite",
        f"{where}tensor {tensor} has {count} NaN/Inf values (first at index {first}: {value})",
        hint="the training run diverged or the file is damaged; use an earlier checkpoint",
        file=str(file) if file is not None else None,
        tensor=tensor,
        index=first,
    )


def _is_onnx_model(path: str | Path) -> bool:
    """An .onnx file, or a folder holding model.onnx (what ``validate --target onnxruntime-genai`` checks against)."""
    p = Path(path)
    return p.suffix == ".onnx" or (p.is_dir() and (p / "model.onnx").is_file())
