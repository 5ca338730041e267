"""GGUF diffusion checkpoints as ComfyUI-GGUF writes them, built from tiny random-weight diffusers transformers.

The rules are city96/ComfyUI-GGUF's (read in its source): ``tools/convert.py`` keeps the original names, writes
``general.architecture`` = the family (``flux``, ``wan``), BF16 tensors as BF16 and others as F16, 1-D and small
(≤ 1024 values) float tensors and the family's ``keys_hiprec`` as F32, and leaves >4-D tensors to
``tools/fix_5d_tensors.py``, which adds them back as F32 (5-D). ``tools/lcpp.patch`` (the patched llama-quantize)
then quantizes 2-D+ tensors but each family's input/output layers, falling back to F16 where a row is no whole
number of the type's blocks. K-quants, which the ``gguf`` package cannot encode, are encoded by
``loratools.ops.merge.kquant_encode`` (llama.cpp's reference quantizers; tests/gguf/test_kquant_encode.py holds it to
libggml's bytes). ``comfy_state`` reads a file back as ComfyUI-GGUF's ``loader.py`` does
(``gguf.GGUFReader``, ``comfy.gguf.orig_shape.<name>`` for the logical shape, the package's dequantization).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: a Flux transformer wide enough that its blocks hold Q8_0 rows (64) and one Q4_K row length (256: img_mlp.2)
FLUX_GGUF_CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 12, 16),
)  # fmt: skip
WAN_GGUF_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=32,
    freq_dim=32, ffn_dim=256, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)  # fmt: skip
QWEN_GGUF_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=(4, 12, 16),
)  # fmt: skip
#: tools/lcpp.patch: names llama-quantize leaves unquantized, per architecture (qwen_image: not in the patch at
#: 795e451 though loader.py takes it; its input/output layers, as for Flux)
NOT_QUANTIZED = {
    "qwen_image": ("img_in.", "txt_in.", "time_text_embed.", "norm_out.", "proj_out."),
    "flux": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    "wan": ("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.",
            "img_emb.", "head."),
}  # fmt: skip
#: tools/convert.py keys_hiprec
HIPREC = {"flux": (), "wan": (".modulation",), "qwen_image": ()}


def flux_model(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**FLUX_GGUF_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def wan_model(seed: int = 0, qwen: bool = False):
    """A Wan transformer (a Qwen-Image one with ``qwen``)."""
    from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(seed)
    cls, config = (QwenImageTransformer2DModel, QWEN_GGUF_CONFIG) if qwen else (WanTransformer3DModel, WAN_GGUF_CONFIG)
    model = cls(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def qwen_model(seed: int = 0):
    return wan_model(seed, qwen=True)


def convert_type(key: str, t: torch.Tensor, arch: str) -> str:
    """tools/convert.py's type for one tensor of the source file."""
    qtype = "BF16" if t.dtype == torch.bfloat16 else "F16"
    if t.dtype in (torch.float32, torch.bfloat16):
        if t.ndim == 1 or t.numel() <= 1024 or any(x in key for x in HIPREC[arch]):
            qtype = "F32"
    return qtype


def quantize_type(
    key: str, t: torch.Tensor, arch: str, current: str, target: str | None, k_quant: tuple, k_type: str = "Q4_K"
) -> str:
    """The patched llama-quantize's type: ``target`` for 2-D+ tensors the patch quantizes whose rows fit its
    blocks (``k_quant`` names get ``k_type``), F16 where a K-quant row does not fit, else the converted type."""
    import gguf

    if target is None or t.ndim < 2 or any(x in key for x in NOT_QUANTIZED[arch]):
        return current
    want = k_type if any(key.startswith(k) for k in k_quant) else target
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want]][0]
    if t.shape[-1] % block:
        return "F16" if want.endswith("_K") else current
    return want


def write_comfy_gguf(
    state: dict[str, torch.Tensor], path: Path, arch: str, target: str | None = "Q8_0", k_quant: tuple = (),
    reshape: tuple = (), k_type: str = "Q4_K",
) -> dict[str, str]:  # fmt: skip
    """``state`` (original names) as ComfyUI-GGUF's convert.py + patched llama-quantize would write it; ``reshape``:
    names stored as (n/256, 256) with ``comfy.gguf.orig_shape`` (convert.py's shape_fix). Returns name -> type."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if target == "Q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    types = {}
    for key, t in state.items():
        qtype = quantize_type(key, t, arch, convert_type(key, t, arch), target, k_quant, k_type)
        qtype = "F32" if t.ndim > 4 else qtype  # fix_5d_tensors.py adds them back as F32
        data = t.float().numpy()
        if key in reshape:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", tuple(int(d) for d in data.shape))
            data = data.reshape(-1, 256)
        if qtype.endswith("_K"):
            from loratools.ops.merge.kquant_encode import quantize

            raw = quantize(data, qtype).reshape(*data.shape[:-1], -1)
        else:
            raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])
        writer.add_tensor(key, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
        types[key] = qtype
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def comfy_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(fp32 tensors in their logical shapes, types, architecture) as ComfyUI-GGUF's loader.py reads the file:
    gguf.GGUFReader, get_orig_shape's INT32 array or the reversed dims, the package's dequantization."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.get_field("general.architecture")
    arch = str(field.parts[field.data[-1]], encoding="utf-8")
    out, types = {}, {}
    for tensor in reader.tensors:
        f = reader.get_field(f"comfy.gguf.orig_shape.{tensor.name}")
        if f is not None:
            assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            shape = tuple(int(f.parts[i][0]) for i in f.data)
        else:
            shape = tuple(int(v) for v in reversed(tensor.shape))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
        types[tensor.name] = tensor.tensor_type.name
    return out, types, arch


def raw_bytes(path: Path) -> dict[str, bytes]:
    import gguf

    return {t.name: bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def dense_deltas(lora: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """ΔW per base tensor by the trainers' rule (alpha/rank · up @ down in fp64; no alpha: alpha = rank);
    ``names``: LoRA stem -> base tensor name."""
    out = {}
    for stem, key in names.items():
        down = lora.get(f"{stem}.lora_down.weight", lora.get(f"{stem}.lora_A.weight")).double()
        up = lora.get(f"{stem}.lora_up.weight", lora.get(f"{stem}.lora_B.weight")).double()
        alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else down.shape[0]
        d = alpha / down.shape[0] * (up @ down)
        out[key] = d.reshape(d.shape[0], -1)
    return out


__all__ = [
    "FLUX_GGUF_CONFIG", "WAN_GGUF_CONFIG", "comfy_state", "dense_deltas", "flux_model", "qwen_model", "raw_bytes",
    "wan_model",
    "write_comfy_gguf",
]  # fmt: skip
