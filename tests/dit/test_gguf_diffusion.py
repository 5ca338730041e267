"""DiT LoRAs merged into GGUF diffusion checkpoints as ComfyUI-GGUF writes them (issue 21 item 3, last part).

Bases: tiny random-weight diffusers Flux, Wan and Qwen-Image transformers in their original names, written by
gguf_dit_support following ComfyUI-GGUF's ``tools/convert.py`` + patched llama-quantize rules (mixed Q8_0 / Q4_K /
F16 / BF16 / F32, a 5-D F32 Wan patch embedding, a reshaped tensor with ``comfy.gguf.orig_shape``). LoRAs:
kohya/musubi files (ai-toolkit for Qwen-Image) with an alpha per module (some none). Oracles: the merged file read
back as ComfyUI-GGUF's loader reads it (gguf.GGUFReader, orig_shape, the package's dequantization) equals
dequant(base) + ΔW (ΔW by the trainers' rule in fp64) within the type's own rounding — Q8_0 within its block step,
a Q4_K tensor (kept Q4_K) within the error of llama.cpp's quantizer on the exact target — after a parity check that
ΔW is far beyond those bounds; a
base holding only F16/BF16/F32 gives exactly the bytes of the safetensors single-file merge of the same tensors;
untouched tensors and the metadata are copied byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from dit_support import BFL_MODULES, kohya_flux, to_bfl
from gguf_dit_support import comfy_state, dense_deltas, flux_model, qwen_model, raw_bytes, wan_model, write_comfy_gguf
from safetensors.torch import load_file, save_file
from wan_qwen_support import QWEN, WAN

from loratools import merge
from loratools.checkpoint.gguf_diffusion import peek_architecture
from loratools.ops.merge.kquant_encode import BLOCK_BYTES

Q4K = "double_blocks.0.img_mlp.2"
BF16_TOP = ("txt_in.", "guidance_in.")  # unquantized by the patch: kept BF16 as convert.py writes a BF16 source


@pytest.fixture(scope="module")
def flux():
    return flux_model()


def _flux_state(model) -> dict[str, torch.Tensor]:
    """The original-layout state: the blocks and two top-level layers BF16 (convert.py writes BF16 then), the rest
    fp32 (F16, or F32 when 1-D or small)."""
    state = to_bfl(model.state_dict())
    bf16 = ("double_blocks", "single_blocks", *BF16_TOP)
    return {k: v.bfloat16() if k.startswith(bf16) else v for k, v in state.items()}


def _flux_files(model, tmp_path: Path, target: str | None = "Q8_0", **kw) -> tuple[Path, Path, dict, dict]:
    base = tmp_path / f"flux-{target or 'F16'}.gguf"
    types = write_comfy_gguf(_flux_state(model), base, "flux", target, **kw)
    lora = kohya_flux(model)
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    return base, path, lora, types


def _flux_deltas(lora: dict) -> dict[str, torch.Tensor]:
    return dense_deltas(lora, {"lora_unet_" + m.replace(".", "_"): f"{m}.weight" for m in BFL_MODULES})


def _q8_0_steps(target: torch.Tensor) -> torch.Tensor:
    """Per value, the Q8_0 step of its block (max|x|/127 over 32 values) in the requantized tensor."""
    blocks = target.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
    return blocks.expand(-1, 32).reshape(target.shape)


def _kquant_round_trip(values: torch.Tensor, kind: str) -> torch.Tensor:
    from loratools.ops.merge.kquant_encode import quantize

    raw = quantize(values.numpy(), kind).reshape(-1, values.shape[-1] // 256 * BLOCK_BYTES[kind])
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(np.ascontiguousarray(back)).reshape(values.shape).double()


def _check_merged(base: Path, out: Path, deltas: dict, types: dict) -> dict[str, float]:
    """Every touched tensor within its type's rounding of dequant(base) + ΔW, every other one byte-identical;
    returns the worst error relative to its bound per type."""
    before, _, _ = comfy_state(base)
    after, out_types, arch = comfy_state(out)
    assert arch == peek_architecture(base)
    assert list(after) == list(before)
    raw_a, raw_b = raw_bytes(base), raw_bytes(out)
    worst: dict[str, float] = {}
    for name in before:
        if name not in deltas:
            assert out_types[name] == types[name] and raw_b[name] == raw_a[name], name
            continue
        target = before[name].double() + deltas[name].reshape(before[name].shape)
        err = (after[name].double() - target).abs()
        kind = types[name]
        if kind.endswith("_K"):  # kept: as close as llama.cpp's own quantizer gets to the exact target
            assert out_types[name] == kind, name
            ref = _kquant_round_trip(target.float(), kind) - target
            rms, ref_rms = float(err.pow(2).mean().sqrt()), float(ref.pow(2).mean().sqrt())
            assert rms <= 1.05 * ref_rms and float(err.max()) <= 1.5 * float(ref.abs().max()), (name, rms, ref_rms)
            assert float(deltas[name].abs().max()) > 5 * float(ref.abs().max()), name  # parity
            worst[kind] = max(worst.get(kind, 0.0), rms / ref_rms)
            continue
        if kind == "Q8_0":
            bound = 0.57 * _q8_0_steps(target.float()).double() + 1e-7  # half a step + the F16 scale's rounding
        elif kind == "F16":
            bound = target.abs() * 2.0**-11 + 2.0**-25  # F16's half ulp
        elif kind == "BF16":
            bound = target.abs() * 2.0**-8 + 2.0**-130
        else:
            bound = target.abs() * 2.0**-23 + 1e-6
        assert bool((err <= bound).all()), (name, kind, float(err.max()))
        assert float(deltas[name].abs().max()) > 20 * float(bound.max()), name  # parity: ΔW is far beyond the bound
        assert out_types[name] == kind, name
        worst[kind] = max(worst.get(kind, 0.0), float((err / bound).max()))
    return worst


def test_flux_q8_0_mixed_types_through_the_cli(flux, tmp_path):
    from click.testing import CliRunner

    from loratools.cli.main import cli

    base, lora_path, lora, types = _flux_files(flux, tmp_path, k_quant=(Q4K,))
    assert {"Q8_0", "Q4_K", "F16", "BF16", "F32"} <= set(types.values())
    out = tmp_path / "out.gguf"
    r = CliRunner().invoke(cli, ["merge", str(base), str(lora_path), "-o", str(out), "--verify", "--json"])
    assert r.exit_code == 0, r.output
    assert '"retyped": []' in r.stdout  # the Q4_K tensor is written back as Q4_K
    deltas = _flux_deltas(lora)
    touched_types = {types[k] for k in deltas}
    assert {"Q8_0", "Q4_K", "F16", "BF16", "F32"} <= touched_types
    worst = _check_merged(base, out, deltas, types)
    assert worst["Q8_0"] <= 1 and worst["F16"] <= 1
    # the metadata is the base's (file type, quantization version) plus the provenance record
    a, b = gguf.GGUFReader(base), gguf.GGUFReader(out)
    assert set(b.fields) - set(a.fields) == {"loratools.provenance"}
    for key in ("general.file_type", "general.quantization_version"):
        assert a.fields[key].parts[-1].tolist() == b.fields[key].parts[-1].tolist()


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_plain_float_base_equals_the_safetensors_merge_byte_for_byte(flux, tmp_path, layout):
    """No quantization: F16, BF16 and F32 tensors; the same tensors as a BFL safetensors single file merged by the
    safetensors path give exactly the GGUF merge's bytes (diffusers layout: its own A per q/k/v, fused into qkv and
    linear1 rows)."""
    from dit_support import diffusers_flux

    base, lora_path, _, types = _flux_files(flux, tmp_path, target=None)
    if layout == "diffusers":
        save_file(diffusers_flux(flux)[0], str(lora_path))
    assert set(types.values()) == {"F16", "BF16", "F32"}
    state, _, _ = comfy_state(base)
    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    single = tmp_path / "flux.safetensors"
    save_file({k: v.to(dtypes[types[k]]).contiguous() for k, v in state.items()}, str(single))
    merge(base, [lora_path], tmp_path / "out.gguf")
    merge(single, [lora_path], tmp_path / "out.safetensors")
    ours, theirs = raw_bytes(tmp_path / "out.gguf"), load_file(str(tmp_path / "out.safetensors"))
    changed = 0
    for k, t in theirs.items():
        want = t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.float32 else t.numpy().tobytes()
        assert ours[k] == want, k
        changed += ours[k] != raw_bytes(base)[k]
    assert changed == len(BFL_MODULES)  # every Linear of the tiny model, in both layouts


def test_reshaped_tensor_keeps_its_orig_shape(flux, tmp_path):
    """convert.py's shape_fix: a tensor stored as (n/256, 256) with comfy.gguf.orig_shape; ΔW lands in the logical
    shape and the file keeps the stored shape and the metadata."""
    name = "double_blocks.0.img_mlp.0.weight"  # (256, 64) logical
    base, lora_path, lora, types = _flux_files(flux, tmp_path, reshape=(name,))
    out = tmp_path / "out.gguf"
    merge(base, [lora_path], out)
    _check_merged(base, out, _flux_deltas(lora), types)
    stored = {t.name: tuple(t.shape) for t in gguf.GGUFReader(out).tensors}
    assert stored[name] == (256, 64)  # GGUF order (ne0 first): the (64, 256) storage
    assert tuple(comfy_state(out)[0][name].shape) == (256, 64)


def test_wan_gguf_with_a_5d_patch_embedding(tmp_path):
    model = wan_model()
    state = WAN.to_original(model.state_dict())
    assert state["patch_embedding.weight"].ndim == 5
    base = tmp_path / "wan-Q8_0.gguf"
    types = write_comfy_gguf(state, base, "wan", "Q8_0")
    assert types["patch_embedding.weight"] == "F32" and "Q8_0" in types.values()
    assert [t.shape.tolist() for t in gguf.GGUFReader(base).tensors if t.name == "patch_embedding.weight"] == [
        [2, 2, 1, 4, 64]
    ]
    lora = WAN.lora(model, "kohya")
    path = tmp_path / "musubi.safetensors"
    save_file(lora, str(path))
    out = tmp_path / "out.gguf"
    summary = merge(base, [path], out, verify=True)
    names = {s.rsplit(".", 2)[0] for s in lora if s.endswith("lora_down.weight")}
    by_kohya = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k for k in state if k.endswith(".weight")}
    deltas = dense_deltas(lora, {n: by_kohya[n] for n in names})
    assert summary.tensors_changed == len(deltas) and summary.retyped == []
    worst = _check_merged(base, out, deltas, types)
    assert "Q8_0" in worst


def test_qwen_image_gguf_with_an_ai_toolkit_lora(tmp_path):
    model = qwen_model()
    state = model.state_dict()  # Qwen-Image's original names are diffusers'
    base = tmp_path / "qwen-image-Q8_0.gguf"
    types = write_comfy_gguf(state, base, "qwen_image", "Q8_0")
    assert "Q8_0" in types.values()
    lora = QWEN.lora(model, "aitoolkit")
    path = tmp_path / "aitoolkit.safetensors"
    save_file(lora, str(path))
    out = tmp_path / "out.gguf"
    merge(base, [path], out, verify=True)
    stems = {k.rsplit(".", 2)[0] for k in lora if k.endswith("lora_A.weight")}
    deltas = dense_deltas(lora, {s: s.removeprefix("diffusion_model.") + ".weight" for s in stems})
    assert "Q8_0" in _check_merged(base, out, deltas, types)


def test_refusals_name_the_base(flux, tmp_path):
    from click.testing import CliRunner

    from loratools.cli.main import cli

    base, lora_path, _, _ = _flux_files(flux, tmp_path)
    out = tmp_path / "out.gguf"
    r = CliRunner().invoke(cli, ["merge", str(base), str(lora_path), "-o", str(out), "--dtype", "bf16"])
    assert r.exit_code == 2 and "a GGUF diffusion model does not take" in r.output
    wan = WAN.lora(wan_model(), "kohya")
    save_file(wan, str(tmp_path / "wan.safetensors"))
    r = CliRunner().invoke(cli, ["merge", str(base), str(tmp_path / "wan.safetensors"), "-o", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output and str(base) in r.output, r.output
    assert not out.exists()


def test_lora_for_an_llm_gguf_is_not_taken_here(tmp_path):
    """An LLM GGUF base still goes to the llama.cpp target (architecture not a diffusion one)."""
    from loratools.checkpoint.gguf_diffusion import is_diffusion_gguf

    w = gguf.GGUFWriter(tmp_path / "llm.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert peek_architecture(tmp_path / "llm.gguf") == "llama" and not is_diffusion_gguf(tmp_path / "llm.gguf")


def test_architecture_found_when_it_is_not_the_first_key(tmp_path):
    from loratools.checkpoint.gguf_diffusion import is_diffusion_gguf

    w = gguf.GGUFWriter(tmp_path / "late.gguf", "flux")
    w.add_uint32("general.quantization_version", 2)
    kv = w.kv_data[0]
    kv["general.architecture"] = kv.pop("general.architecture")  # now the last key/value
    w.add_tensor("img_in.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert peek_architecture(tmp_path / "late.gguf") is None and is_diffusion_gguf(tmp_path / "late.gguf")


def test_weights_per_adapter(flux, tmp_path):
    """--weights 1,-1 of one LoRA gives the base back (within one step of each type), and 0.5,0.5 the LoRA once."""
    base, lora_path, lora, types = _flux_files(flux, tmp_path)
    merge(base, [lora_path, lora_path], tmp_path / "zero.gguf", weights=[1, -1])
    before, after = comfy_state(base)[0], comfy_state(tmp_path / "zero.gguf")[0]
    for name, w in before.items():
        step = _q8_0_steps(w) if types[name] == "Q8_0" else w.abs() * 2.0**-10 + 2.0**-24
        assert bool(((after[name] - w).abs() <= step * 1.01).all()), name
    merge(base, [lora_path, lora_path], tmp_path / "half.gguf", weights=[0.5, 0.5])
    _check_merged(base, tmp_path / "half.gguf", _flux_deltas(lora), types)
