"""Orthogonal updates: PEFT OFT (v2 layout) and LyCORIS diagonal OFT. Both need the base weight.

PEFT OFT (peft/tuners/oft/layer.py, ``OFTRotationModule``): ``oft_R.weight`` holds, per block, the
b(b−1)/2 upper-triangle entries of a skew-symmetric Q (``triu_indices(b, b, 1)``). The rotation of a
block is the Cayley transform R = (I − Q)(I + Q)⁻¹, or, with ``use_cayley_neumann``, the truncated
series I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1) with n = ``num_cayley_neumann_terms``. With ``coft`` the
packed Q is first projected into a ball of radius eps/√(blocks). The rotations form a block-diagonal
matrix over the *input* side (``block_share``: one block repeated) and W' = W·Rᵀ, conv weights taken
as out×(in·kh·kw).

LyCORIS diag-OFT (lycoris/functional/diag_oft.py, lycoris/modules/diag_oft.py): ``oft_blocks``
(n, b, b) over the *output* side: Q = B − Bᵀ, scaled down to norm alpha·out when ‖Q‖_F exceeds it
(``alpha`` is the constraint; 0 = none), R = (I + Q)(I − Q)⁻¹, W'[block k] = R_kᵀ·W[block k], then
W' ← ``rescale`` ⊙ W' per output row when present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loratools.errors import ShapeError
from loratools.families.base import FamilyModule

#: PEFT's default is 5; each term is one more b×b product per block, and the series has converged long before
MAX_NEUMANN_TERMS = 100


def skew_from_packed(vec: torch.Tensor, block: int) -> torch.Tensor:
    """(n, b(b−1)/2) packed upper triangles -> (n, b, b) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(block, block, 1)
    q = torch.zeros(vec.shape[0], block, block, dtype=vec.dtype)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def block_size_for(n_elements: int) -> int:
    """b with b(b−1)/2 == n_elements (ShapeError if none)."""
    b = int(round((1 + (1 + 8 * n_elements) ** 0.5) / 2))
    if b * (b - 1) // 2 != n_elements:
        raise ShapeError(f"OFT: {n_elements} packed entries is not b(b-1)/2 for any block size b")
    return b


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """PEFT OFT's rotation of each skew-symmetric block (exact Cayley or its truncated series)."""
    n, b, _ = q.shape
    eye = torch.eye(b, dtype=q.dtype).expand(n, b, b)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if terms > 1:
        r = r + 2 * q
        if terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q
    return r


@dataclass(eq=False)
class OFTModule(FamilyModule):
    """PEFT OFT: packed skew blocks ``weight`` (r or 1, b(b−1)/2). ``n_blocks`` None: from the base (block_share)."""

    weight: torch.Tensor
    n_blocks: int | None = None
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5
    kind: str = "linear"
    fan_in_fan_out: bool = False
    weight_shape: tuple[int, ...] | None = None

    family = "oft"
    label = "OFT"
    multiplicative = True

    def __post_init__(self) -> None:
        super().__post_init__()
        terms = self.num_cayley_neumann_terms
        if self.use_cayley_neumann and not 0 <= terms <= MAX_NEUMANN_TERMS:
            raise ShapeError(f"num_cayley_neumann_terms is {terms}; expected 0 to {MAX_NEUMANN_TERMS}")
        if self.weight.ndim != 2:
            raise ShapeError(f"OFT: oft_R.weight must be 2-D, got {tuple(self.weight.shape)}")
        self.block_size = block_size_for(int(self.weight.shape[1]))
        if not self.block_share:
            self.n_blocks = int(self.weight.shape[0])

    @property
    def rank(self) -> int:
        return int(self.n_blocks or 0)

    @property
    def in_features(self) -> int | None:
        return self.n_blocks * self.block_size if self.n_blocks else None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"oft_R.weight": self.weight}

    def describe(self) -> dict[str, object]:
        return {
            "blocks": self.n_blocks,
            "block_size": self.block_size,
            "block_share": self.block_share,
            "cayley": f"neumann ({self.num_cayley_neumann_terms} terms)" if self.use_cayley_neumann else "exact",
            "coft": self.coft,
        }

    def _packed(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight.to(dtype)
        if not self.coft:
            return w
        q = skew_from_packed(w, self.block_size)
        eps = self.eps / (q.shape[0] ** 0.5)
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        q = torch.where(norm <= eps, q, eps * (q / norm))
        rows, cols = torch.triu_indices(self.block_size, self.block_size, 1)
        return q[:, rows, cols]

    def rotation(self, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The in×in block-diagonal rotation R (W' = W·Rᵀ)."""
        if in_features % self.block_size:
            raise ShapeError(f"OFT: blocks of {self.block_size} do not tile {in_features} inputs")
        n = in_features // self.block_size
        if not self.block_share and n != self.n_blocks:
            raise ShapeError(f"OFT: {self.n_blocks} blocks of {self.block_size} but the base has {in_features} inputs")
        q = skew_from_packed(self._packed(torch.float64), self.block_size)
        r = cayley(q, self.use_cayley_neumann, self.num_cayley_neumann_terms)
        blocks = [r[0]] * n if self.block_share else list(r)
        return torch.block_diag(*blocks).to(dtype)

    def merged_matrix(self, base2d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = base2d.to(dtype)
        return w @ self.rotation(int(w.shape[1]), dtype).T


@dataclass(eq=False)
class DiagOFTModule(FamilyModule):
    """LyCORIS diag-OFT: ``blocks`` (n, b, b) on the output side, ``constraint_alpha`` (0: none), ``rescale``."""

    blocks: torch.Tensor
    constraint_alpha: float = 0.0
    rescale: torch.Tensor | None = None
    kind: str = "linear"
    weight_shape: tuple[int, ...] | None = None

    family = "diag_oft"
    label = "LyCORIS diag-OFT"
    multiplicative = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocks.ndim != 3 or self.blocks.shape[1] != self.blocks.shape[2]:
            raise ShapeError(f"diag-OFT: oft_blocks must be (n, b, b), got {tuple(self.blocks.shape)}")
        r = self.rescale
        if r is not None and (r.ndim < 2 or r.shape[0] != self.out_features or r[0].numel() != 1):
            raise ShapeError(
                f"rescale has shape {list(r.shape)}; expected ({self.out_features}, 1, ...): one factor per output "
                f"row of the {self.out_features} the oft_blocks cover"
            )
        if not math.isfinite(self.constraint_alpha):
            raise ShapeError(f"the constraint alpha is {self.constraint_alpha}; it must be a finite number")

    @property
    def rank(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[0] * self.blocks.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"oft_blocks": self.blocks}
        if self.rescale is not None:
            t["rescale"] = self.rescale
        return t

    def describe(self) -> dict[str, object]:
        return {
            "blocks": self.rank,
            "block_size": int(self.blocks.shape[1]),
            "constraint": self.constraint_alpha,
            "rescale": self.rescale is not None,
        }

    def rotations(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        b = self.blocks.to(torch.float64)
        q = b - b.transpose(1, 2)
        limit = self.constraint_alpha * self.out_features
        if limit > 0:
            norm = float(torch.linalg.norm(q)) + 1e-8
            if norm > limit:
                q = q * (limit / norm)
        eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
        return ((eye + q) @ torch.linalg.inv(eye - q)).to(dtype)

    def merged_matrix(self, base2d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = base2d.to(dtype)
        if w.shape[0] != self.out_features:
            raise ShapeError(f"diag-OFT: blocks cover {self.out_features} outputs but the base has {w.shape[0]}")
        n, b, _ = self.blocks.shape
        r = self.rotations(dtype)
        out = torch.einsum("knm,kni->kmi", r, w.reshape(n, b, -1)).reshape(w.shape)
        if self.rescale is not None:
            out = out * self.rescale.to(dtype).reshape(-1, 1)
        return out
