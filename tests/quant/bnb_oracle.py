"""bitsandbytes as the 4-bit oracle on the CPU: its own pure-torch reference arithmetic, not its AVX-512 kernels.

bitsandbytes 0.49+ dequantizes 4-bit tensors on the CPU with native kernels (csrc/cpu_ops.cpp). Their AVX-512
branch reads each value's absmax at ``row * (n // blocksize) + column // blocksize``, as if every row began a new
block; bitsandbytes' blocks run over the flattened tensor, so whenever a row is not a multiple of the block (a
96-wide ``down_proj`` with 64-value blocks) the values after the first row get another block's scale: a 64x96
N(0,1) round trip is off by 1.7 instead of nf4's usual 0.45 (0.50.2 on an AVX-512 Xeon or EPYC; its NEON branch
checks the row length, its scalar branch is right). The kernel falls back to bitsandbytes' pure-torch reference
(``backends.default.ops._dequantize_4bit_compute``: fp32 code x absmax, one cast at the end, the CUDA kernel's
arithmetic) for odd rows and blocks >= 2048; :func:`use_reference_4bit` makes the CPU take that path always, the
fused ``gemv_4bit`` (absmax rounded to bf16) the reference dequantize + linear, and ``Linear4bit`` skip its
AVX512-BF16 weight repacking (which raises on such rows). Releases 0.46-0.48 have no
native kernel but their reference rounds the code table to the output dtype before scaling (bf16 values one
rounding off CUDA's), hence the pin to 0.50.x in pyproject's test extra. ``test_dequant.py`` checks the result
against a reference written out here, so a wrong oracle fails there by name.
"""

from __future__ import annotations

import warnings

import torch

#: NF4's 16 code values (QLoRA, Dettmers et al. 2023, appendix E), in code order
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_LIB: list[torch.library.Library] = []


def use_reference_4bit() -> None:
    """Route bitsandbytes' CPU ``dequantize_4bit`` and ``gemv_4bit`` to its own pure-torch reference (idempotent)."""
    if _LIB:
        return
    import bitsandbytes.nn.modules  # registers its kernels first, so ours replace them
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):  # noqa: ANN001, ANN202, N803
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)  # noqa: N806
        code = _get_4bit_code(quant_type, A.device)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    def gemv_4bit(A, B, shapeB, absmax, code, blocksize):  # noqa: ANN001, ANN202, N803
        quant_type = "fp4" if code[1] > 0 else "nf4"
        weight = torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, blocksize, quant_type, shapeB, A.dtype)
        return torch.nn.functional.linear(A, weight)

    lib = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        lib.impl("dequantize_4bit", dequantize_4bit, "CPU")
        lib.impl("gemv_4bit", gemv_4bit, "CPU")
    _LIB.append(lib)
    # Linear4bit.__init__ asks has_avx512bf16() whether to repack an eval-mode weight for the fused CPU kernel,
    # whose packer assumes rows of whole blocks ("shape '[64, 1]' is invalid for input of size 96"): the layers
    # made from here on take the generic path (dequantize_4bit + matmul), as on a CPU without AVX512-BF16.
    bitsandbytes.nn.modules.has_avx512bf16 = lambda: False


def nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], blocksize: int) -> torch.Tensor:
    """NF4 by its definition: two codes a byte (high nibble first), one absmax per ``blocksize`` flat values."""
    flat = packed.view(torch.uint8).reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[: torch.Size(shape).numel()]
    values = torch.tensor(NF4, dtype=torch.float32)[codes.long()]
    scale = absmax.float().repeat_interleave(blocksize)[: values.numel()]
    return (values * scale).reshape(shape)
