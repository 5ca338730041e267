"""LoRA slots: graph inputs through which onnxruntime feeds an adapter at run time (multi-LoRA).

For every targeted module, the graph gets two optional inputs named as Olive and onnxruntime-genai
name them: ``<module>.lora_A.weight`` [in, r] and ``<module>.lora_B.weight`` [r, out] (B pre-scaled),
``<module>`` being the module path of the base checkpoint. Each has a same-named zero-rank default
initializer, so a run without an adapter is the base model. The MatMul/Gemm ``y = x·W`` becomes
``y + (x·A)·B``; ``ort.LoraAdapter`` + ``RunOptions.add_active_adapter`` switch adapters per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from loratools.errors import UnsupportedError, ValidationError
from loratools.onnx.graph import GraphIndex

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from loratools.model.adapter import Adapter

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def slot_names(module: str) -> tuple[str, str]:
    return module + A_SUFFIX, module + B_SUFFIX


def check_slot_module(name: str, module: object, label: str) -> None:
    """Refuse what a slot cannot express: DoRA, LoRA biases, embedding and conv modules."""
    kind = getattr(module, "kind", "linear")
    what = None
    if getattr(module, "magnitude", None) is not None:
        what = "DoRA (a magnitude vector)"
    elif getattr(module, "bias", None) is not None:
        what = "a LoRA bias"
    elif kind != "linear":
        what = f"a {kind} module"
    if what:
        raise UnsupportedError(
            f"{label}: module {name} uses {what}; LoRA slots hold only plain linear LoRA",
            hint="merge this adapter instead (`loratools export-onnx MODEL --adapter ...` or `loratools merge`)",
        )


def add_slots(
    model: onnx.ModelProto,
    modules: Iterable[str],
    where: str = "the ONNX model",
    parameters: dict[str, str] | None = None,
) -> list[str]:
    """Add LoRA slot inputs for ``modules`` (base module paths) to ``model`` in place; returns the modules.

    ``parameters`` optionally maps a module to its weight's parameter name when it differs from
    ``<module>.weight``.
    """
    from onnx import helper

    index = GraphIndex(model)
    graph = model.graph
    inserts: dict[int, list[onnx.NodeProto]] = {}
    position = {id(n): i for i, n in enumerate(graph.node)}
    done = []
    for module in modules:
        parameter = (parameters or {}).get(module, module + ".weight")
        if parameter not in index.parameters:
            raise ValidationError(f"{where}: no weight {parameter} for LoRA slot {module}")
        site = index.site(parameter, where)
        if site.layout == "embedding":
            raise UnsupportedError(f"{where}: {module} is an embedding; LoRA slots hold only linear modules")
        weight = index.initializers[site.initializer]
        rows, cols = site.shape
        in_features, out_features = (cols, rows) if site.layout == "out_in" else (rows, cols)
        a_name, b_name = slot_names(module)
        dtype = weight.data_type
        specs = ((a_name, [in_features, None], [in_features, 0]), (b_name, [None, out_features], [0, out_features]))
        for name, shape, dims in specs:
            value = helper.make_tensor_value_info(name, dtype, shape)
            graph.input.append(value)
            graph.initializer.append(helper.make_tensor(name, dtype, dims, vals=[]))
        node = site.node
        # y = x·W becomes y = x·W + (x·A)·B; the product is renamed so y keeps its consumers and name
        x, y = node.input[0], node.output[0]
        tag = module.replace(".", "_")
        base, xa, delta = f"{tag}_lora_base", f"{tag}_lora_xa", f"{tag}_lora_delta"
        node.output[0] = base
        new = [
            helper.make_node("MatMul", [x, a_name], [xa], name=f"{tag}_lora_A"),
            helper.make_node("MatMul", [xa, b_name], [delta], name=f"{tag}_lora_B"),
            helper.make_node("Add", [base, delta], [y], name=f"{tag}_lora_add"),
        ]
        inserts.setdefault(position[id(node)], []).extend(new)
        done.append(module)
    ordered = []
    for i, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(inserts.get(i, []))
    del graph.node[:]
    graph.node.extend(ordered)
    return done


def slot_modules(model: onnx.ModelProto) -> dict[str, dict[str, object]]:
    """The LoRA slots of a graph: module -> {"in", "out", "dtype"} (from its ``lora_A``/``lora_B`` inputs)."""
    from onnx import helper

    inputs = {i.name: i for i in model.graph.input}
    found: dict[str, dict[str, object]] = {}
    for name, value in inputs.items():
        if not name.endswith(A_SUFFIX):
            continue
        module = name[: -len(A_SUFFIX)]
        b = inputs.get(module + B_SUFFIX)
        if b is None:
            continue
        a_dims = value.type.tensor_type.shape.dim
        b_dims = b.type.tensor_type.shape.dim
        found[module] = {
            "in": int(a_dims[0].dim_value),
            "out": int(b_dims[1].dim_value),
            "dtype": str(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)),
        }
    return found


def slot_tensors(adapter: Adapter, dtype: str = "float32", label: str = "adapter") -> dict[str, np.ndarray]:
    """The adapter as slot inputs: ``A.T`` [in, r] and ``(scale·B).T`` [r, out] per module (fp32 math)."""
    import numpy as np

    tensors: dict[str, np.ndarray] = {}
    for name, module in adapter.modules.items():
        check_slot_module(name, module, label)
        up, down = module.factors()
        a_name, b_name = slot_names(name)
        tensors[a_name] = np.ascontiguousarray(down.T.numpy().astype(dtype))
        tensors[b_name] = np.ascontiguousarray((up * module.scale).T.numpy().astype(dtype))
        for key in (a_name, b_name):
            if not np.isfinite(tensors[key]).all():
                from loratools.errors import NumericError

                first = [int(i) for i in np.argwhere(~np.isfinite(tensors[key]))[0]]
                raise NumericError(
                    f"{label}: tensor {key} overflows {dtype} (NaN/Inf after the cast, first at index {first})",
                    hint="write the adapter in fp32 (--dtype fp32)",
                )
    return tensors
