"""GPTQ and AWQ (GEMM) integer weights, unpacked in plain torch.

GPTQ (AutoGPTQ / gptqmodel / transformers+optimum layout): ``qweight`` int32 (in·bits/32, out), codes
packed along the *input* dimension, lowest bits first; ``qzeros`` int32 (groups, out·bits/32) packed
along the output dimension; ``scales`` (groups, out); ``g_idx`` (in,) the group of each input row
(act-order makes it a permutation of groups; absent means ``i // group_size``). The original
("v1", ``checkpoint_format: gptq``) format stores zero − 1; ``gptq_v2`` stores the zero itself.
Wᵀ[i, o] = scales[g_idx[i], o] · (q[i, o] − zero[g_idx[i], o]).

AWQ GEMM (autoawq ``WQLinear_GEMM``): ``qweight`` int32 (in, out/8) packed along the *output*
dimension in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7]; ``qzeros`` (in/group, out/8) likewise;
``scales`` (in/group, out); zeros stored as they are. Wᵀ = (q − zero) · scales.

Both are computed exactly in fp32 (a small integer times a 16-bit scale) and cast once to the
scales' dtype, which is what the reference implementations produce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratools.errors import FormatError, UnsupportedError

if TYPE_CHECKING:
    import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (n, m) -> codes (n·32/bits, m): word r holds rows r·k .. r·k+k-1, lowest bits first."""
    import torch

    k = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, k, 1)) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0] * k, packed.shape[1])


def _unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (n, m) -> codes (n, m·32/bits): word c holds columns c·k .. c·k+k-1, lowest bits first."""
    import torch

    k = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = (packed.to(torch.int32).unsqueeze(2) >> shifts.view(1, 1, k)) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], packed.shape[1] * k)


def _check_bits(bits: int, where: str) -> None:
    if bits not in (2, 4, 8):
        raise UnsupportedError(
            f"{where}: {bits}-bit GPTQ weights are not supported (2, 4 and 8 bits are)",
            hint="dequantize the base with its own library and merge into the 16-bit copy",
        )


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    v1: bool,
    where: str,
) -> torch.Tensor:
    """The (out, in) weight of a GPTQ layer, in the scales' dtype."""
    import torch

    _check_bits(bits, where)
    q = _unpack_rows(qweight, bits)  # (in, out)
    zeros = _unpack_cols(qzeros, bits)[:, : scales.shape[1]]  # (groups, out)
    if v1:
        zeros = zeros + 1
    n_in = q.shape[0]
    if g_idx is None:
        size = group_size if group_size > 0 else n_in
        g = torch.arange(n_in, dtype=torch.int64) // size
    else:
        g = g_idx.to(torch.int64).reshape(-1)
        if g.numel() != n_in:
            raise FormatError(f"{where}: g_idx has {g.numel()} entries, qweight unpacks to {n_in} input rows")
    if int(g.min()) < 0 or int(g.max()) >= scales.shape[0]:
        raise FormatError(f"{where}: g_idx points outside the {scales.shape[0]} groups of scales")
    w = (q - zeros[g]).to(torch.float32) * scales.to(torch.float32)[g]
    return w.to(scales.dtype).T.contiguous()


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int, where: str
) -> torch.Tensor:  # noqa: E501
    """The (out, in) weight of an AWQ GEMM layer, in the scales' dtype."""
    import torch

    if bits != 4:
        raise UnsupportedError(f"{where}: {bits}-bit AWQ weights are not supported (4 bits are)")
    k = 32 // bits
    # column c·8 + AWQ_ORDER[j] sits in nibble j of word c: undo the interleave
    reverse = torch.tensor([AWQ_ORDER.index(i) for i in range(k)], dtype=torch.int64)

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        codes = _unpack_cols(packed, bits).reshape(packed.shape[0], packed.shape[1], k)
        return codes[:, :, reverse].reshape(packed.shape[0], packed.shape[1] * k)

    q = unpack(qweight)  # (in, out)
    zeros = unpack(qzeros)  # (groups, out)
    size = group_size if group_size > 0 else q.shape[0]
    if zeros.shape[0] * size < q.shape[0] or scales.shape != zeros.shape:
        raise FormatError(f"{where}: AWQ qzeros {tuple(zeros.shape)} / scales {tuple(scales.shape)} do not fit")
    g = torch.arange(q.shape[0], dtype=torch.int64) // size
    w = (q - zeros[g]).to(torch.float32) * scales.to(torch.float32)[g]
    return w.to(scales.dtype).T.contiguous()
