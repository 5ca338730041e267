"""K-quant GGUF diffusion bases (the Q4_K_S / Q5_K_S / Q6_K / Q3_K files ComfyUI-GGUF users hold): a merged K-quant
tensor stays in its type (issue 21 item 3), as close to dequant(base) + ΔW as llama.cpp's own quantizer gets to that
exact sum (its bytes are held to libggml's in tests/gguf/test_kquant_encode.py), nothing retyped, the file no larger
than the base, every other tensor as in the Q8_0 test (test_gguf_diffusion._check_merged)."""

from __future__ import annotations

import pytest
from test_gguf_diffusion import Q4K, _check_merged, _flux_deltas, _flux_files, flux  # noqa: F401 - flux: fixture

from loratools import merge


#: Q2_K is left out here: its 2-bit error on these tiny random weights exceeds ΔW, so the parity check cannot hold
@pytest.mark.parametrize("kind", ["Q6_K", "Q5_K", "Q4_K", "Q3_K"])
def test_flux_k_quant_tensor_keeps_its_type(flux, tmp_path, kind):  # noqa: F811
    base, lora_path, lora, types = _flux_files(flux, tmp_path, k_quant=(Q4K,), k_type=kind)
    assert types[f"{Q4K}.weight"] == kind
    out = tmp_path / "out.gguf"
    summary = merge(base, [lora_path], out, verify=True)
    assert summary.retyped == []
    assert out.stat().st_size <= base.stat().st_size + 4096  # + the provenance record
    worst = _check_merged(base, out, _flux_deltas(lora), types)
    assert worst[kind] <= 1.05
