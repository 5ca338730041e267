"""Where a module's weight lives in an ONNX graph, and which way round it is stored.

A weight is found by its initializer name (exports that keep names) or through the
``pkg.onnxscript.optimizer.folded_from`` metadata onnxscript's optimizer writes on the value_info of a
folded initializer (torch.onnx's default export: ``Transpose(W)`` folded into ``val_N``). Its layout is
read from the graph, never guessed from its shape: the initializer is followed through Transpose /
Cast / Identity nodes to the MatMul or Gemm that uses it; ``y = x @ W`` means W is stored (in, out),
a Transpose on the way or ``Gemm(transB=1)`` means (out, in).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratools.errors import UnsupportedError, ValidationError

if TYPE_CHECKING:
    import onnx

FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_PASS_THROUGH = ("Cast", "CastLike", "Identity")


@dataclass
class WeightSite:
    """One weight initializer and the node that multiplies by it."""

    parameter: str  # the parameter name (``model.layers.0.self_attn.q_proj.weight``)
    initializer: str  # the initializer holding it (the same name, or ``val_N`` when folded)
    layout: str  # "out_in" (PyTorch Linear layout), "in_out" (x @ W) or "embedding" (Gather rows)
    node: onnx.NodeProto  # the MatMul / Gemm / Gather using it
    shape: tuple[int, ...]


class GraphIndex:
    """Initializers, consumers and the parameter-name map of one graph (built once per model)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.initializers = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
        #: parameter name -> initializer name
        self.parameters: dict[str, str] = {name: name for name in self.initializers}
        folded: dict[str, list[str]] = {}
        for vi in graph.value_info:
            if vi.name not in self.initializers:
                continue
            for prop in vi.metadata_props:
                if prop.key == FOLDED_FROM:
                    folded[vi.name] = _parse_list(prop.value)
        for init, sources in folded.items():
            if len(sources) == 1 and sources[0] not in self.initializers:
                self.parameters.setdefault(sources[0], init)

    def matcher_keys(self) -> list[str]:
        return list(self.parameters)

    def site(self, parameter: str, where: str = "the ONNX model") -> WeightSite:
        """The weight named ``parameter``: its initializer, the node using it, and its stored layout."""
        init = self.parameters[parameter]
        uses = list(self._uses(init, transposed=False, seen=set()))
        compute = [u for u in uses if u[0].op_type in ("MatMul", "Gemm", "Gather")]
        other = [u for u in uses if u[0].op_type not in ("MatMul", "Gemm", "Gather")]
        label = parameter if init == parameter else f"{parameter} (stored as {init})"
        if len(compute) != 1 or other:
            used = ", ".join(sorted({u[0].op_type for u in uses})) or "nothing"
            raise UnsupportedError(
                f"{where}: weight {label} is used by {len(uses)} node(s) ({used}); "
                "loratools can only patch a weight used by exactly one MatMul, Gemm or Gather",
                hint="a shared (tied or deduplicated) weight cannot take a per-module delta; "
                "re-export the merged checkpoint instead",
            )
        node, index, transposed = compute[0]
        layout = _layout(node, index, transposed, label, where)
        tensor = self.initializers[init]
        return WeightSite(parameter, init, layout, node, tuple(int(d) for d in tensor.dims))

    def _uses(self, name: str, transposed: bool, seen: set[str]) -> Iterable[tuple[onnx.NodeProto, int, bool]]:
        if name in seen:
            return
        seen.add(name)
        for node, index in self.consumers.get(name, []):
            if node.op_type == "Transpose" and _is_2d_swap(node):
                yield from self._uses(node.output[0], not transposed, seen)
            elif node.op_type in _PASS_THROUGH and index == 0:
                yield from self._uses(node.output[0], transposed, seen)
            else:
                yield node, index, transposed


def _parse_list(text: str) -> list[str]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else []


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_2d_swap(node: onnx.NodeProto) -> bool:
    perm = _attr(node, "perm")
    return perm is None or list(perm) == [1, 0]


def _layout(node: onnx.NodeProto, index: int, transposed: bool, label: str, where: str) -> str:
    """The stored layout of a weight that reaches ``node`` at input ``index`` after ``transposed`` swaps."""
    if node.op_type == "Gather":
        if index != 0 or transposed:
            raise UnsupportedError(f"{where}: weight {label} reaches a Gather in an unexpected way")
        return "embedding"
    if node.op_type == "MatMul":
        if index != 1:
            raise UnsupportedError(f"{where}: weight {label} is the left operand of a MatMul; cannot patch it")
        return "out_in" if transposed else "in_out"
    # Gemm: Y = alpha * A' @ B' + beta * C
    if index == 1:
        trans_b = bool(_attr(node, "transB", 0))
        return "out_in" if trans_b != transposed else "in_out"
    raise UnsupportedError(f"{where}: weight {label} is Gemm input {index}; only the B operand can be patched")


def check_shape(site: WeightSite, out_features: int, in_features: int, where: str) -> None:
    """Raise ValidationError when the stored weight cannot hold an (out, in) delta in its layout."""
    expected = (out_features, in_features) if site.layout == "out_in" else (in_features, out_features)
    if site.shape != expected:
        raise ValidationError(
            f"{where}: weight {site.parameter} is stored as {list(site.shape)} ({site.layout.replace('_', ', ')}); "
            f"the adapter expects {list(expected)}",
            hint="the adapter was trained for another model",
        )
