"""LoRAs merged into ComfyUI fp8-scaled single files (issue 21 item 3): a tiny Flux transformer in the original
(BFL) layout, its blocks' Linear weights float8_e4m3fn + per-tensor ``scale_weight`` and the ``scaled_fp8``
marker (comfy_fp8_support: ComfyUI's layout and quantizer), a kohya LoRA with per-module alphas.

Oracles: the dequantization is bit-equal to torch's float8 cast × scale as ComfyUI computes it (float32 in its
LoRA patching, cast once to bf16 as its runtime ``TensorCoreFP8Layout.dequantize`` does); the 16-bit merge equals
dense torch math on that dequantized base (≤1e-5 in fp32), after a parity check that the LoRA moves the weights
far beyond that; ``--requantize`` equals ComfyUI's quantizer applied to the dense fp32 merge, with every tensor
no adapter touches copied byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfy_fp8_support import dequantize, quantize, scaled_file
from dit_support import BFL_MODULES, kohya_flux, to_bfl, transformer
from safetensors.torch import load_file, save_file

from loratools import merge
from loratools.checkpoint.reader import open_checkpoint

P = "model.diffusion_model."


@pytest.fixture(scope="module")
def model():
    return transformer()


def _files(model, tmp_path, prefix=P, lora_scale=1.0, **kw):
    state = to_bfl(model.state_dict(), prefix)
    base = tmp_path / "flux-fp8-scaled.safetensors"
    save_file(scaled_file(state, prefix, **kw), str(base))
    lora = kohya_flux(model)
    lora = {k: v * lora_scale if ".lora_up." in k else v for k, v in lora.items()}
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    return base, path, lora


def _deltas(lora: dict, prefix: str) -> dict[str, torch.Tensor]:
    """Dense ΔW per base key by the trainers' rule: alpha/rank · up @ down (no alpha: alpha = rank)."""
    out = {}
    for bfl in BFL_MODULES:
        stem = "lora_unet_" + bfl.replace(".", "_")
        down, up = lora[f"{stem}.lora_down.weight"].double(), lora[f"{stem}.lora_up.weight"].double()
        alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else down.shape[0]
        out[f"{prefix}{bfl}.weight"] = (alpha / down.shape[0] * (up @ down)).float()
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_dequantization_is_torch_cast_times_scale(model, tmp_path):
    base, _, _ = _files(model, tmp_path)
    raw = load_file(str(base))
    with open_checkpoint(base) as reader:
        assert reader.quant.scheme == "comfy-scaled-fp8" and len(reader.quant.tensors) == 13
        assert not any(k.endswith(("scale_weight", "scaled_fp8")) for k in reader.keys())
        for key in reader.quant.tensors:
            q, s = raw[key], raw[key.removesuffix(".weight") + ".scale_weight"]
            fp32 = reader.quant.get(key, torch.float32)
            assert torch.equal(fp32, q.to(torch.float32) * s.to(torch.float32))  # ComfyUI's LoRA patch path
            runtime = q.to(torch.bfloat16).mul_(s)  # TensorCoreFP8Layout.dequantize into bf16
            assert reader.get(key).dtype == torch.bfloat16 and torch.equal(reader.get(key), runtime)


@pytest.mark.parametrize("prefix", [P, ""])
def test_16bit_merge_equals_dense_math_on_the_dequantized_base(model, tmp_path, prefix):
    base, path, lora = _files(model, tmp_path, prefix)
    raw = load_file(str(base))
    deltas = _deltas(lora, prefix)
    out = tmp_path / "merged.safetensors"
    merge(base, [path], out, dtype="fp32")
    merged = load_file(str(out))
    assert set(merged) == {k for k in raw if not k.endswith(("scale_weight", "scaled_fp8"))}  # a plain file now
    worst, moved = 0.0, 0.0
    for k, v in merged.items():
        scale = raw.get(k.removesuffix(".weight") + ".scale_weight")
        w = dequantize(raw[k], scale).to(torch.bfloat16).float() if scale is not None else raw[k].float()
        want = w + deltas[k] if k in deltas else w
        moved = max(moved, float((want - w).abs().max()))
        worst = max(worst, float((v.float() - want).abs().max()))
    assert moved > 0.1  # parity: the LoRA moves the weights far beyond the tolerance
    assert worst <= 1e-5, worst
    merge(base, [path], tmp_path / "bf16.safetensors")  # the default: the file's own 16-bit dtype
    assert {v.dtype for v in load_file(str(tmp_path / "bf16.safetensors")).values()} == {torch.bfloat16}


def test_requantize_writes_comfyui_fp8_with_new_scales(model, tmp_path):
    base, path, lora = _files(model, tmp_path, scale_input=True)
    raw = load_file(str(base))
    deltas = _deltas(lora, P)
    out = tmp_path / "merged-fp8.safetensors"
    result = merge(base, [path], out, requantize=True)
    merged = load_file(str(out))
    assert list(merged) == list(raw) and all(merged[k].dtype == raw[k].dtype for k in raw)
    touched = set(deltas) | {k.removesuffix(".weight") + ".scale_weight" for k in deltas}
    for k in set(raw) - touched:  # norms, biases, scale_input, the marker: byte for byte
        assert _bytes(merged[k]) == _bytes(raw[k]), k
    rows = {r.key: r for r in result.quant.rows}
    assert len(rows) == 13
    for k in rows:
        s_old = raw[k.removesuffix(".weight") + ".scale_weight"]
        dense = dequantize(raw[k], s_old) + deltas[k]
        q_want, s_want = quantize(dense)
        s_new = merged[k.removesuffix(".weight") + ".scale_weight"]
        assert s_new.dtype == torch.float32 and s_new.shape == s_old.shape
        assert torch.allclose(s_new, s_want, rtol=1e-6, atol=0)
        same = (merged[k].view(torch.uint8) == q_want.view(torch.uint8)).float().mean()
        assert same >= 0.999, (k, float(same))  # codes differ only where fp32 op order tips a tie
        assert 0.9 < rows[k].rho < 1.1
    assert not result.quant.warnings


def test_a_tiny_update_is_reported_as_rounded_away(model, tmp_path):
    base, path, _ = _files(model, tmp_path, lora_scale=1e-4)
    result = merge(base, [path], tmp_path / "m.safetensors", requantize=True)
    assert max(r.rho for r in result.quant.rows) < 0.5
    assert any("rounds away" in w for w in result.quant.warnings)


def test_float32_marker_and_e5m2(model, tmp_path):
    """ComfyUI: a float32 marker means float8_e4m3fn; an e5m2 file merges to 16-bit, --requantize refuses it."""
    base, path, _ = _files(model, tmp_path, marker=torch.float32)
    with open_checkpoint(base) as reader:
        assert {t.settings["fp8_dtype"] for t in reader.quant.tensors.values()} == {"F8_E4M3"}
    state = load_file(str(base))
    e5 = {k: v.float().to(torch.float8_e5m2) if v.dtype == torch.float8_e4m3fn else v for k, v in state.items()}
    e5[f"{P}scaled_fp8"] = torch.empty(0, dtype=torch.float8_e5m2)
    save_file(e5, str(tmp_path / "e5.safetensors"))
    merge(tmp_path / "e5.safetensors", [path], tmp_path / "m.safetensors")
    from loratools.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="float8_e5m2"):
        merge(tmp_path / "e5.safetensors", [path], tmp_path / "q.safetensors", requantize=True)


def test_info_takes_an_original_layout_single_file_as_the_base() -> None:
    """A BFL single file (original names, no LoRA tensor) is a base for --base, not 'an adapter (kohya)'."""
    from models import run_cli

    flux = Path(__file__).resolve().parents[2] / "fixtures" / "dit" / "flux"
    code, out, err = run_cli(["info", flux / "kohya-lora.safetensors", "--base", flux / "flux1-tiny.safetensors"])
    assert code == 0, err
    assert "of the base's" in out
