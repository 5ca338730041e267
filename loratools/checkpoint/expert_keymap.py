"""Expert slices -> the tensors a mixture-of-experts checkpoint holds on disk.

An expert LoRA names the parameter the model holds in memory (``mlp.experts.gate_up_proj``, ``(E, 2I, H)``);
a checkpoint stores the experts as transformers' ``save_pretrained`` wrote them (transformers 5.25,
``conversion_mapping.py`` and each model's ``modeling_*.py``, read there):

- **per expert** (Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE ...): ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``,
  ``(I, H)``/``(I, H)``/``(H, I)``; the in-memory ``gate_up_proj[e]`` is gate rows ``[:I]`` then up rows ``[I:]``
  (``Concatenate(dim=1)`` of the stacked experts, and the forward's ``chunk(2, dim=-1)``);
- **per expert, Mixtral names**: ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down), the
  router ``block_sparse_moe.gate`` (in memory ``mlp.gate``);
- **fused** (gpt-oss, Llama-4 ...): the 3-D parameter itself, ``(E, d1, d2)`` as in memory; gpt-oss's
  ``gate_up_proj`` interleaves gate and up columns (``[..., ::2]`` / ``[..., 1::2]``), which a merge into the
  same fused tensor never needs to split.

:func:`lower_experts` turns every expert slice into what the base holds: plain LoRA modules keyed by the
per-expert module (a gate_up slice splits into its gate rows and its up rows of B: exact), or the slice of
the fused tensor (its key, expert index and layout checked against the tensor's shape). Anything else is
refused with the names looked for.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loratools.errors import ShapeError, UnsupportedError, ValidationError

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter, LoraModule
    from loratools.model.experts import ExpertLoraModule

#: fused in-memory parameter -> its per-expert parts on disk, in row order, by naming scheme
PER_EXPERT_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
#: container renames transformers 5 applies on load (Mixtral: ``block_sparse_moe`` on disk, ``mlp`` in memory)
DISK_CONTAINERS = ((".mlp.", ".block_sparse_moe."),)


class ExpertTargets:
    """Resolves expert slices (and modules under a renamed MoE container) against one base's tensor names."""

    def __init__(self, reader: Any, where: str) -> None:  # a CheckpointReader (keymap.Named + tensor_key)
        self.reader = reader
        self.where = where
        self.keys = set(reader.keys())
        self._counts: dict[tuple[str, str], int] = {}

    def tensor_key(self, module: str, suffix: str = "weight") -> str | None:
        """The base's key for ``module.suffix`` (a CheckpointReader resolves wrapper prefixes; else exact)."""
        resolve = getattr(self.reader, "tensor_key", None)
        if resolve is not None:
            return resolve(module, suffix)
        return f"{module}.{suffix}" if f"{module}.{suffix}" in self.keys else None

    def _disk_containers(self, container: str) -> list[str]:
        names = [container]
        for mem, disk in DISK_CONTAINERS:
            if mem in f".{container}.":
                names.append(f".{container}.".replace(mem, disk, 1).strip("."))
        return names

    def _count(self, container: str, part: str) -> int:
        """How many experts ``container`` holds on disk (``container.{i}.part.weight`` keys)."""
        if (container, part) not in self._counts:
            pattern = re.compile(rf"{re.escape(container)}\.(\d+)\.{re.escape(part)}\.weight")
            self._counts[container, part] = len({m[1] for k in self.keys if (m := pattern.fullmatch(k))})
        return self._counts[container, part]

    def plain(self, name: str) -> str | None:
        """A plain module under a renamed container (Mixtral's router ``mlp.gate``): its disk name, else None."""
        if self.tensor_key(name) is not None:
            return None
        for disk in self._disk_containers(name)[1:]:
            if f"{disk}.weight" in self.keys:
                return disk
        return None

    def lower(self, m: ExpertLoraModule) -> dict[str, LoraModule]:
        """The modules that carry slice ``m`` into this base (see the module docstring)."""
        container, _, leaf = m.parameter.rpartition(".")
        fused = self.tensor_key(container, leaf)
        if fused is not None:
            return {fused_key(fused, m.expert): self._fused(m, fused)}
        for disk in self._disk_containers(container):
            for parts in PER_EXPERT_PARTS.get(leaf, ()):
                if self._count(disk, parts[0]):
                    return self._per_expert(m, disk, parts)
        schemes = PER_EXPERT_PARTS.get(leaf, ())
        looked = [m.parameter]
        looked += [f"{d}.{m.expert}.{p}.weight" for d in self._disk_containers(container) for ps in schemes for p in ps]
        raise ValidationError(
            f"{self.where}: expert parameter {m.parameter} has no tensor in the base {self.reader_root()} "
            f"(looked for {', '.join(looked)})",
            hint="is this the base model the adapter was trained on? (quantized MoE layouts such as MXFP4 "
            "*_blocks are not merged into yet)",
        )

    def resolves(self, m: ExpertLoraModule) -> bool:
        """Whether :meth:`lower` finds slice ``m`` in this base."""
        from loratools.errors import LoratoolsError

        try:
            self.lower(m)
        except LoratoolsError:
            return False
        return True

    def reader_root(self) -> Any:
        return getattr(self.reader, "root", "checkpoint")

    def _fused(self, m: ExpertLoraModule, key: str) -> ExpertLoraModule:
        shape = tuple(self.reader.info(key).shape)
        straight, flipped = (m.out_features, m.in_features), (m.in_features, m.out_features)
        if len(shape) != 3 or shape[0] != m.num_experts:
            raise ShapeError(
                f"{self.where}: {m.parameter} holds {m.num_experts} experts of {list(straight)} (out, in), but the "
                f"base tensor {key} has shape {list(shape)}",
                hint="the adapter was trained on a different model size or layout",
            )
        have = shape[1:]
        fifo = m.fan_in_fan_out
        if not m.orientation_known:
            if straight == flipped and have == straight:
                raise UnsupportedError(
                    f"{self.where}: {m.parameter} is square per expert ({list(have)}) and the adapter does not say "
                    "whether its model stores experts (out, in) or (in, out)",
                    hint="merge into a base whose config.json names its model_type (the transformers MoE "
                    "layouts are known), or add the base model's auto_mapping to adapter_config.json",
                )
            fifo = have == flipped
        if have != (flipped if fifo else straight):
            raise ShapeError(
                f"{self.where}: expert {m.expert} of {m.parameter} is a {list(straight)} (out, in) update stored "
                f"{'(in, out)' if fifo else '(out, in)'}, but the base tensor {key} holds experts of {list(have)}",
                hint="the adapter was trained on a different model size or layout",
            )
        return replace(m, parameter=key, fan_in_fan_out=fifo, orientation_known=True)

    def _per_expert(self, m: ExpertLoraModule, disk: str, parts: tuple[str, ...]) -> dict[str, LoraModule]:
        from loratools.model.adapter import LoraModule

        count = self._count(disk, parts[0])
        if count != m.num_experts:
            raise ShapeError(
                f"{self.where}: {m.parameter} has {m.num_experts} experts, the base holds {count} under {disk} "
                f"({disk}.{{i}}.{parts[0]}.weight)",
                hint="the adapter was trained on a base with another expert count",
            )
        if m.fan_in_fan_out or (not m.orientation_known and m.in_features == m.out_features):
            raise UnsupportedError(
                f"{self.where}: {m.parameter} stores experts (in, out) in memory but the base holds them as "
                f"per-expert linear weights ({disk}.{{i}}.{parts[0]}.weight); loratools does not split that layout",
            )
        out: dict[str, LoraModule] = {}
        row = 0
        for part in parts:
            name = f"{disk}.{m.expert}.{part}"
            key = f"{name}.weight"
            if key not in self.keys:
                raise ValidationError(f"{self.where}: expert {m.expert} of {m.parameter} needs {key}, not in the base")
            rows, cols = (tuple(self.reader.info(key).shape) + (None,))[:2]
            if cols != m.in_features or row + rows > m.out_features:
                raise ShapeError(
                    f"{self.where}: expert {m.expert} of {m.parameter} is a {[m.out_features, m.in_features]} "
                    f"(out, in) update, but its part {key} has shape {list(self.reader.info(key).shape)}",
                    hint="the adapter was trained on a different model size",
                )
            out[name] = LoraModule(down=m.down, up=m.up[row : row + rows], alpha=m.alpha, use_rslora=m.use_rslora)
            row += rows
        if row != m.out_features:
            raise ShapeError(
                f"{self.where}: expert {m.expert} of {m.parameter} has {m.out_features} output rows, its parts "
                f"{', '.join(f'{disk}.{m.expert}.{p}' for p in parts)} hold {row}",
                hint="the adapter was trained on a different model size",
            )
        return out


def where(adapter: Adapter) -> str:
    """What messages call the adapter: where it was read from."""
    return str(adapter.meta.get("source") or (adapter.meta.get("files") or ["adapter"])[0])


def fused_key(tensor: str, expert: int) -> str:
    from loratools.model.experts import expert_key

    return expert_key(tensor, expert)


def lower_experts(adapter: Adapter, reader: Any, read: Any = None) -> Adapter:
    """``adapter`` with every expert slice in the base's on-disk terms (see the module docstring); an
    adapter without expert slices comes back as it is. ``read(t)`` gives the data of a tensor left in its file
    (a merge's lean load): per-expert modules fused into slices of a fused base are read first."""
    from loratools.model.experts import ExpertLoraModule, has_experts
    from loratools.model.per_expert import PER_EXPERT

    per_expert = [n for n in adapter.modules if PER_EXPERT.match(n)]
    renamed = any(d in k for _, d in DISK_CONTAINERS for k in reader.keys())
    if not per_expert and not has_experts(adapter) and not renamed:
        return adapter
    targets = ExpertTargets(reader, where(adapter))
    adapter = _fuse_for_fused_base(adapter, per_expert, targets, read)
    modules: dict[str, Any] = {}
    for name, m in adapter.modules.items():
        if isinstance(m, ExpertLoraModule):
            modules.update(targets.lower(m))
        else:
            modules[targets.plain(name) or name] = m
    return replace(adapter, modules=modules, meta=dict(adapter.meta))


def _fuse_for_fused_base(adapter: Adapter, per_expert: list[str], targets: ExpertTargets, read: Any) -> Adapter:
    """Per-expert modules (``experts.{e}.gate_proj`` ...) a base holds fused (``experts.gate_up_proj``, 3-D) as
    expert slices of the fused tensor (gate and up stacked, exact: model/per_expert.py); the rest as they are."""
    from loratools.model.per_expert import PER_EXPERT, fuse_experts

    missing = set()
    for name in per_expert:
        if targets.tensor_key(name) is None and targets.plain(name) is None:
            m = PER_EXPERT.match(name)
            gated = m is not None and m["part"] in ("gate_proj", "up_proj", "w1", "w3")
            fused = "gate_up_proj" if gated else "down_proj"
            if m is not None and targets.tensor_key(f"{m['pre']}.mlp.experts", fused) is not None:
                missing.add(name)
    if not missing:
        return adapter
    if read is not None:  # fusing compares and stacks the factors: they need their data
        modules = dict(adapter.modules)
        for name in missing:
            m = modules[name]
            modules[name] = replace(m, down=read(m.down), up=read(m.up))
        adapter = replace(adapter, modules=modules)

    def count(parameter: str) -> int:
        container, _, leaf = parameter.rpartition(".")
        key = targets.tensor_key(container, leaf)
        return int(targets.reader.info(key).shape[0]) if key is not None else 0

    return fuse_experts(adapter, count, missing)
