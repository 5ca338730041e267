"""The canonical in-memory adapter model.

Every format reads into :class:`Adapter` and writes from it; no code converts one file layout into
another directly. Keys of :attr:`Adapter.modules` are the base model's module paths without any PEFT
prefix (``model.layers.0.self_attn.q_proj``); pipeline adapters put the component first
(``unet.down_blocks.0.attentions.0.proj_in``).

Factor conventions (PEFT's): ``down`` is A with shape ``(r, in)`` (conv: ``(r, in, kh, kw)``,
embedding: ``(r, num_embeddings)``), ``up`` is B with shape ``(out, r)`` (conv: ``(out, r, 1, 1)``,
embedding: ``(embedding_dim, r)``). ``delta()`` returns ``scale * B @ A`` in the base weight's layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch

from loratools.errors import ShapeError, UnsupportedError
from loratools.families import FamilyModule

Kind = Literal["linear", "conv", "embedding"]
KINDS: tuple[str, ...] = ("linear", "conv", "embedding")


def scale_for(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """LoRA's effective multiplier: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    if rank <= 0:
        return 0.0
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


@dataclass
class LoraModule:
    """One adapted module: ΔW = scale · B · A (see the module docstring for shapes)."""

    #: the update family (see :mod:`loratools.families` for the others)
    family: ClassVar[str] = "lora"
    label: ClassVar[str] = "LoRA"
    multiplicative: ClassVar[bool] = False

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    kind: Kind = "linear"
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        from loratools.families.base import widen_float8_fields

        widen_float8_fields(self)
        if self.kind not in KINDS:
            raise ShapeError(f"unknown module kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.down.ndim < 2 or self.up.ndim < 2:
            raise ShapeError(
                f"LoRA factors must be at least 2-D (down {tuple(self.down.shape)}, up {tuple(self.up.shape)})"
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise ShapeError(
                f"rank mismatch: down (A) has {self.down.shape[0]} rows, up (B) has {self.up.shape[1]} columns",
                hint="the adapter file is inconsistent; re-export it from its training tool",
            )
        if self.kind == "conv" and any(s != 1 for s in self.up.shape[2:]):
            raise ShapeError(f"conv LoRA up (B) must be 1x1, got {tuple(self.up.shape)}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def needs_base(self) -> bool:
        """True for DoRA: the merged weight depends on the base weight's norms."""
        return self.magnitude is not None

    @property
    def is_low_rank(self) -> bool:
        """True unless DoRA (a DoRA update is exactly low-rank only together with its base)."""
        return self.magnitude is None

    @property
    def max_rank(self) -> int:
        return self.rank

    @property
    def scale(self) -> float:
        """The effective multiplier applied to B·A (alpha/r, or alpha/√r for rsLoRA)."""
        return scale_for(self.alpha, self.rank, self.use_rslora)

    @property
    def in_features(self) -> int:
        """Input size (for conv: in_channels·kh·kw; for embeddings: num_embeddings)."""
        return int(self.down[0].numel())

    @property
    def out_features(self) -> int:
        """Output size (for embeddings: embedding_dim)."""
        return int(self.up.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module adapts, in the base's layout."""
        if self.kind == "embedding":
            return (self.in_features, self.out_features)
        if self.kind == "conv":
            return (self.out_features, *self.down.shape[1:])
        if self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def transposed(self) -> bool:
        """Whether the base weight is stored (in, out) rather than (out, in)."""
        return self.kind == "embedding" or (self.kind == "linear" and self.fan_in_fan_out)

    @property
    def parameters(self) -> int:
        n = self.down.numel() + self.up.numel()
        n += self.magnitude.numel() if self.magnitude is not None else 0
        n += self.bias.numel() if self.bias is not None else 0
        return int(n)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` as 2-D matrices (out×r, r×in) in ``dtype``, scale not applied."""
        up = self.up.reshape(self.up.shape[0], -1).to(dtype)
        down = self.down.reshape(self.down.shape[0], -1).to(dtype)
        return up, down

    def to_weight_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """Reshape/transpose an out×in matrix into the base weight's layout."""
        if self.transposed:
            return matrix.T.contiguous()
        if self.kind == "conv":
            return matrix.reshape(self.weight_shape)
        return matrix

    def from_weight_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_weight_layout`: a base-layout tensor as an out×in matrix."""
        if self.transposed:
            return weight.T
        return weight.reshape(weight.shape[0], -1)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """scale·B·A in the base weight's layout, computed in ``dtype`` (fp32 by default)."""
        up, down = self.factors(dtype)
        if device is not None:
            up, down = up.to(device), down.to(device)
        return self.to_weight_layout((up * self.scale) @ down)

    def with_factors(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> LoraModule:
        """A copy with new factors (and alpha), everything else kept."""
        return replace(self, down=down, up=up, alpha=self.alpha if alpha is None else alpha)


#: any adapted module: plain LoRA (with its factor-space fast paths) or a member of another family
AdapterModule = LoraModule | FamilyModule


def module_tensors(m: AdapterModule) -> dict[str, torch.Tensor]:
    """Every tensor a module holds, by its role name (LoRA: lora_A, lora_B, magnitude, bias)."""
    if isinstance(m, LoraModule):
        roles = (("lora_A", m.down), ("lora_B", m.up), ("magnitude", m.magnitude), ("bias", m.bias))
        return {k: t for k, t in roles if t is not None}
    return m.tensors()


def require_lora(adapter: Adapter, command: str) -> None:
    """UnsupportedError (one line naming the module and family) when ``adapter`` holds non-LoRA modules."""
    for name, m in adapter.modules.items():
        if not isinstance(m, LoraModule):
            raise UnsupportedError(
                f"{command}: module {name} is {m.label}, not plain LoRA; {command} handles plain LoRA only",
                hint="lower it first: loratools convert ADAPTER --to peft --as-lora -o OUT (add --base BASE for "
                "OFT/BOFT/IA3)",
            )


@dataclass
class Adapter:
    """A LoRA adapter: modules keyed by module path, full replacements, and metadata.

    ``replacements`` maps a base *tensor* name (``lm_head.weight``, ``score.bias``) to a full tensor
    that replaces the base one (PEFT ``modules_to_save``, saved embedding base layers).
    ``meta`` holds ``format`` (the format it was read from), ``base_model`` (a model id, may be None),
    ``metadata`` (safetensors ``__metadata__`` strings), ``config`` (the raw config dict, if any) and
    ``provenance`` (the loratools record, if any).
    """

    modules: dict[str, LoraModule] = field(default_factory=dict)  # or FamilyModule: see AdapterModule
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def format(self) -> str | None:
        return self.meta.get("format")

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")

    @property
    def parameters(self) -> int:
        """Trainable parameters: factors, magnitudes, biases and full replacements."""
        return sum(m.parameters for m in self.modules.values()) + sum(
            int(t.numel()) for t in self.replacements.values()
        )

    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def alphas(self) -> set[float]:
        return {float(a) for m in self.modules.values() if (a := getattr(m, "alpha", None)) is not None}

    def dtypes(self) -> set[torch.dtype]:
        return {
            t.dtype
            for m in self.modules.values()
            for t in ((m.down, m.up) if isinstance(m, LoraModule) else m.tensors().values())
        }

    def families(self) -> set[str]:
        """The update families present (``lora``, ``loha``, ``lokr``, ``oft``, ``boft``, ``ia3``, ``diag_oft``)."""
        return {m.family for m in self.modules.values()}

    def select(self, include: str | None = None, exclude: str | None = None) -> Adapter:
        """A copy keeping only modules whose names match ``include`` and not ``exclude`` (regexes)."""
        from loratools.args.filters import module_filter

        keep = module_filter(include, exclude)
        return replace(
            self,
            modules={k: v for k, v in self.modules.items() if keep(k)},
            replacements={k: v for k, v in self.replacements.items() if keep(k.rsplit(".", 1)[0])},
            meta=dict(self.meta),
        )

    def renamed(self, mapping: dict[str, str]) -> Adapter:
        """A copy with module keys renamed by ``mapping`` (keys not in it are kept)."""
        return replace(
            self,
            modules={mapping.get(k, k): v for k, v in self.modules.items()},
            meta=dict(self.meta),
        )
