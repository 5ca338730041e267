"""onnxruntime's LoRA adapter file (``.onnx_adapter``), written and read with ``ort.AdapterFormat``.

Parameters are named after the slot inputs of a graph exported with ``loratools export-onnx
--lora-slots``: ``<module>.lora_A.weight`` [in, r] and ``<module>.lora_B.weight`` [r, out], B already
multiplied by the LoRA scale (so an adapter read back has alpha = r). The file holds no metadata
beyond an adapter and a model version, so no provenance record can be stored in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, UnsupportedError, UsageError, ValidationError
from loratools.formats.registry import AdapterFormat, register_format
from loratools.model.adapter import Adapter, LoraModule

if TYPE_CHECKING:
    from loratools.formats.registry import KeyResolver

SUFFIX = ".onnx_adapter"
_NP_DTYPES = {"fp32": "float32", "fp16": "float16"}


def _ort():  # noqa: ANN202
    from loratools.onnx.runtime import ort_module

    return ort_module()


@register_format
class OnnxAdapterFormat(AdapterFormat):
    name = "onnx-adapter"
    layout = "file"

    @classmethod
    def sniff(cls, path: Path) -> bool:
        return path.is_file() and path.suffix == SUFFIX

    @classmethod
    def read(cls, path: Path, base: KeyResolver | None = None) -> Adapter:
        import torch

        from loratools.onnx.runtime import ort_message
        from loratools.onnx.slots import A_SUFFIX, B_SUFFIX

        try:
            params = _ort().AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as exc:  # onnxruntime raises its own RuntimeError subclasses
            reason = ort_message(exc)
            raise FormatError(f"{path}: not a readable .onnx_adapter file ({reason})", path=path) from None
        modules: dict[str, LoraModule] = {}
        for name in sorted(params):
            if not name.endswith(A_SUFFIX):
                if not name.endswith(B_SUFFIX):
                    raise FormatError(f"{path}: parameter {name} is not a LoRA slot tensor", path=path)
                continue
            module = name[: -len(A_SUFFIX)]
            b_name = module + B_SUFFIX
            if b_name not in params:
                raise ValidationError(f"{path}: {name} has no matching {b_name}", path=path)
            a = torch.from_numpy(params[name].numpy().copy())
            b = torch.from_numpy(params[b_name].numpy().copy())
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValidationError(
                    f"{path}: {module}: A {list(a.shape)} and B {list(b.shape)} are not [in, r] and [r, out]",
                    path=path,
                )
            rank = int(a.shape[1])
            modules[module] = LoraModule(down=a.T.contiguous(), up=b.T.contiguous(), alpha=float(rank))
        stray = sorted(
            n[: -len(B_SUFFIX)] for n in params if n.endswith(B_SUFFIX) and n[: -len(B_SUFFIX)] not in modules
        )
        if stray:
            raise ValidationError(f"{path}: {stray[0]}{B_SUFFIX} has no matching lora_A tensor", path=path)
        return Adapter(modules=modules, meta={"format": cls.name, "files": [str(path)]})

    @classmethod
    def write(
        cls,
        adapter: Adapter,
        path: Path,
        provenance: dict[str, Any] | None = None,
        dtype: str | None = None,
        model: str | Path | None = None,
        **options: Any,
    ) -> None:
        """Write ``adapter`` for a slot graph; ``dtype`` fp32 | fp16 (default: the slot graph's, else fp32).

        With ``model`` (an ONNX folder or file with LoRA inputs: ``export-onnx --lora-slots``, Olive, the
        onnxruntime-genai builder) the tensors take the names, sizes, dtype and rank of the graph's inputs
        (:func:`loratools.onnx.slot_map.slot_feeds`); an adapter may cover a subset of them.
        """
        from loratools.onnx.slot_map import slot_feeds
        from loratools.onnx.slots import check_slot_module, slot_tensors

        if dtype not in (None, "auto") and dtype not in _NP_DTYPES:
            raise UsageError(f"the onnx-adapter format stores fp32 or fp16, not {dtype}", hint="pass --dtype fp32|fp16")
        np_dtype = None if dtype in (None, "auto") else _NP_DTYPES[dtype]
        for name, module in adapter.modules.items():  # DoRA, biases, embedding and conv first: the root cause
            check_slot_module(name, module, str(adapter.meta.get("source", "adapter")))
        if adapter.replacements:
            first = sorted(adapter.replacements)[0]
            raise UnsupportedError(
                f"{first}: full replacement tensors (modules_to_save) cannot be fed through LoRA slots",
                hint="merge the adapter instead (`loratools export-onnx MODEL --adapter ADAPTER`)",
            )
        if not adapter.modules:
            raise ValidationError("the adapter has no LoRA modules to write")
        if model is not None:  # names, sizes, dtype and rank from the graph's LoRA inputs
            tensors = slot_feeds(adapter, model, np_dtype)
        else:
            tensors = slot_tensors(adapter, np_dtype or "float32", str(adapter.meta.get("source", "adapter")))
        ort = _ort()
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
        fmt.export_adapter(str(path))
