"""PEFT BOFT: a butterfly product of block-diagonal orthogonal matrices, then a per-output scale.

``boft_R`` (m, n, b, b) holds m butterfly factors of n raw b×b blocks; each block becomes
R = (I − S)(I + S)⁻¹ with S = (X − Xᵀ)/2. Factor i is Pᵢ·diag(R)·Pᵢᵀ with Pᵢ the butterfly
permutation of PEFT's ``block_butterfly_perm(in, n/2ⁱ, b/2, m−1)`` (identity for m = 1), and the
product M = M_{m−1}···M_0. W' = (W·Mᵀ) ⊙ ``boft_s`` (out, 1). Checked in peft/tuners/boft/layer.py
(``update_layer``, ``get_delta_weight``, ``merge``). The number of factors is read from the tensor:
PEFT without its CUDA extension trains m = 1 whatever the config says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratools.errors import ShapeError
from loratools.families.base import FamilyModule


def butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm`` (indices)."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ShapeError("BOFT: invalid number of butterfly blocks")
    block = n // b
    indices = torch.arange(n)
    step = block / r
    order = torch.empty(block, dtype=torch.long)
    initial = torch.arange(block)
    seq = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    for i, pos in enumerate(seq):
        order[int(i * r) : int(i * r + r)] = initial[int(pos * r) : int(pos * r + r)]
    for i in range(0, n, block):
        indices[i : i + block] = indices[i : i + block][order]
    return indices


@dataclass(eq=False)
class BOFTModule(FamilyModule):
    """BOFT: ``R`` (m, n, b, b) raw blocks and ``s`` (out, 1)."""

    R: torch.Tensor
    s: torch.Tensor
    kind: str = "linear"
    fan_in_fan_out: bool = False
    weight_shape: tuple[int, ...] | None = None

    family = "boft"
    label = "BOFT"
    multiplicative = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.R.ndim != 4 or self.R.shape[2] != self.R.shape[3]:
            raise ShapeError(f"BOFT: boft_R must be (factors, blocks, b, b), got {tuple(self.R.shape)}")
        m, n, b, _ = (int(d) for d in self.R.shape)
        # PEFT's update_layer: factor i permutes n / 2^i blocks of b / 2, so 2^(m-1) divides n and b is even
        if m > 1 and (m - 1 > n.bit_length() or n % (2 ** (m - 1)) or b % 2):
            raise ShapeError(
                f"boft_R has shape {list(self.R.shape)}: {m} butterfly factors do not fit {n} blocks of {b} "
                f"(PEFT needs 2^(factors-1) to divide the block count and an even block size)"
            )
        if self.s.ndim != 2 or self.s.shape[1] != 1:
            raise ShapeError(f"boft_s has shape {list(self.s.shape)}; expected (out, 1)")

    @property
    def rank(self) -> int:
        return int(self.R.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.R.shape[1] * self.R.shape[2])

    @property
    def out_features(self) -> int:
        return int(self.s.numel())

    @property
    def shape2d(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"boft_R": self.R, "boft_s": self.s}

    def describe(self) -> dict[str, object]:
        m, n, b, _ = self.R.shape
        return {"butterfly_factors": int(m), "blocks": int(n), "block_size": int(b)}

    def rotation(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m, n, b, _ = self.R.shape
        size = n * b
        x = self.R.to(torch.float64).reshape(m * n, b, b)
        skew = 0.5 * (x - x.transpose(1, 2))
        eye = torch.eye(b, dtype=torch.float64).expand_as(skew)
        rot = torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(m, n, b, b)
        total = torch.eye(size, dtype=torch.float64)
        for i in range(m):
            perm = butterfly_perm(size, int(n / (2**i)), int(b / 2), m - 1)
            p = torch.zeros(size, size, dtype=torch.float64)
            p[torch.arange(size), perm] = 1.0
            factor = p @ torch.block_diag(*rot[i]) @ p.T
            total = factor @ total
        return total.to(dtype)

    def merged_matrix(self, base2d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = base2d.to(dtype)
        return (w @ self.rotation(dtype).T) * self.s.to(dtype).reshape(-1, 1)
