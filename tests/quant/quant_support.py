"""Tiny quantized bases for tests/quant, each made by the quantizer's own code where it runs on the CPU.

- bitsandbytes 4-bit (nf4 + double quant, fp4) and 8-bit: transformers' ``BitsAndBytesConfig`` load
  and ``save_pretrained`` (bitsandbytes' CPU backend).
- FP8 block-scaled: transformers' own ``Fp8Quantize`` op (the one its save path runs), config as
  ``FineGrainedFP8Config`` writes it; transformers itself dequantizes it on load without a GPU.
- AWQ GEMM: autoawq's ``WQLinear_GEMM.from_linear`` packer (skipped where autoawq is not installed).
- GPTQ: packed here after gptqmodel's layout (no GPTQ library runs on this CPU-only setup).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from bnb_oracle import use_reference_4bit  # noqa: E402

MODEL_KW = {"hidden_size": 64, "intermediate_size": 96}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = list(LINEAR)


@pytest.fixture(scope="session", autouse=True)
def bnb_reference_4bit() -> None:
    """bitsandbytes' 4-bit CPU arithmetic through its pure-torch reference (bnb_oracle.py says why)."""
    use_reference_4bit()


@pytest.fixture(scope="session")
def base_model() -> torch.nn.Module:
    return models.build_model("llama", **MODEL_KW)


@pytest.fixture(scope="session")
def base16(tmp_path_factory: pytest.TempPathFactory, base_model: torch.nn.Module) -> Path:
    return models.save_base(base_model, tmp_path_factory.mktemp("b16") / "base", dtype=torch.bfloat16)


def bnb_save(base: Path, out: Path, **bnb_kw: Any) -> Path:
    """Quantize ``base`` with transformers + bitsandbytes on the CPU and save it as they do."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(**bnb_kw)
    q = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=cfg, device_map="cpu", dtype=torch.bfloat16)
    q.save_pretrained(str(out))
    return out


BNB_KINDS = {
    "nf4-dq": dict(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}  # fmt: skip


@pytest.fixture(scope="session")
def bnb_bases(tmp_path_factory: pytest.TempPathFactory, base16: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bnb")
    return {name: bnb_save(base16, root / name, **kw) for name, kw in BNB_KINDS.items()}


def fp8_save(base: Path, out: Path, block: list[int] | None) -> Path:
    """An FP8 checkpoint of ``base`` made by transformers' own ``Fp8Quantize`` (per-tile or per-tensor)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    qcfg = types.SimpleNamespace(scale_fmt=None, weight_block_size=block)
    op = Fp8Quantize(types.SimpleNamespace(quantization_config=qcfg))
    out.mkdir(parents=True)
    tensors = {}
    for k, v in load_file(str(base / "model.safetensors")).items():
        if k.endswith(".weight") and k.split(".")[-2] in LINEAR:
            if block is None:
                op._resolve_block_size = lambda value: tuple(value.shape[-2:])  # one tile: per-tensor
            else:
                op._resolve_block_size = lambda value: tuple(block)
            tensors.update(op._quantize_one(k, v))
        else:
            tensors[k] = v
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": block}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def fp8_base(tmp_path_factory: pytest.TempPathFactory, base16: Path) -> Path:
    return fp8_save(base16, tmp_path_factory.mktemp("fp8") / "fp8", [32, 32])


_AWQ_PACKER: tuple[Any, Any] | None = None


def load_awq_packer() -> Any:
    """autoawq's WQLinear_GEMM and dequantize_gemm without its package __init__ (which needs datasets)."""
    import importlib.util

    global _AWQ_PACKER
    if _AWQ_PACKER is not None:
        return _AWQ_PACKER
    if "awq" in sys.modules:  # the real package, already imported
        from awq.modules.linear.gemm import WQLinear_GEMM
        from awq.utils.packing_utils import dequantize_gemm

        _AWQ_PACKER = (WQLinear_GEMM, dequantize_gemm)
        return _AWQ_PACKER
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("autoawq is not installed (pip install --no-deps autoawq runs its CPU packer)")
    # A bare stand-in for the package lets its submodules import; it is taken out of sys.modules again so that
    # no later ``import awq`` in this process (transformers' own checks, other tests) meets the stub.
    before = set(sys.modules)
    pkg = types.ModuleType("awq")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["awq"] = pkg
    try:
        from awq.modules.linear.gemm import WQLinear_GEMM
        from awq.utils.packing_utils import dequantize_gemm
    finally:
        for name in set(sys.modules) - before:
            if name == "awq" or name.startswith("awq."):
                del sys.modules[name]
    _AWQ_PACKER = (WQLinear_GEMM, dequantize_gemm)
    return _AWQ_PACKER


def minmax_groups(w: torch.Tensor, group: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-group scales and integer zeros of ``w`` (out, in): shapes (in/group, out)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    maxq = 2**bits - 1
    scales = ((hi - lo) / maxq).clamp(min=1e-5)
    zeros = torch.round(-lo / scales).clamp(0, maxq)
    return scales.T.contiguous(), zeros.T.contiguous()


def gptq_pack(w: torch.Tensor, group: int, perm: torch.Tensor | None, v1: bool = True) -> dict[str, torch.Tensor]:
    """GPTQ tensors of ``w`` (out, in) after gptqmodel's layout; ``perm`` gives act-order group indices."""
    out_f, in_f = w.shape
    g_idx = torch.arange(in_f) // group if perm is None else (torch.argsort(perm) // group)
    wt = w.float().T  # (in, out)
    n_groups = in_f // group
    scales = torch.empty(n_groups, out_f)
    zeros = torch.empty(n_groups, out_f)
    for gi in range(n_groups):
        rows = wt[g_idx == gi]
        lo, hi = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
        scales[gi] = ((hi - lo) / 15).clamp(min=1e-5)
        zeros[gi] = torch.round(-lo / scales[gi]).clamp(0, 15)
    scales = scales.half()
    q = torch.clamp(torch.round(wt / scales.float()[g_idx] + zeros[g_idx]), 0, 15).to(torch.int64)
    qweight = torch.zeros(in_f // 8, out_f, dtype=torch.int64)
    for i in range(8):
        qweight |= q[i::8] << (4 * i)
    z = zeros.to(torch.int64) - (1 if v1 else 0)
    z &= 0xF
    qzeros = torch.zeros(n_groups, out_f // 8, dtype=torch.int64)
    for i in range(8):
        qzeros |= z[:, i::8] << (4 * i)
    return {
        "qweight": _as_int32(qweight),
        "qzeros": _as_int32(qzeros),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (in int64) as the int32 tensors GPTQ stores."""
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def gptq_reference(t: dict[str, torch.Tensor], v1: bool = True) -> torch.Tensor:
    """W (out, in) = scales[g_idx] * (q - zero[g_idx]), unpacked bit by bit (AutoGPTQ's formula)."""
    qw = t["qweight"].to(torch.int64) & 0xFFFFFFFF
    qz = t["qzeros"].to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(qw >> (4 * i)) & 0xF for i in range(8)], 1).reshape(-1, qw.shape[1])
    z = torch.stack([(qz >> (4 * i)) & 0xF for i in range(8)], 2).reshape(qz.shape[0], -1) + (1 if v1 else 0)
    g = t["g_idx"].long()
    return (t["scales"][g] * (q - z[g]).to(torch.float16)).T


def save_int_packed(base: Path, out: Path, method: str, pack: Any, qcfg: dict[str, Any]) -> Path:
    """A GPTQ/AWQ checkpoint: every layer linear replaced by ``pack(weight) -> tensors``, the rest as is."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    tensors = {}
    for k, v in load_file(str(base / "model.safetensors")).items():
        if k.endswith(".weight") and k.split(".")[-2] in LINEAR:
            module = k[: -len(".weight")]
            tensors.update({f"{module}.{role}": t.contiguous() for role, t in pack(v.float()).items()})
        else:
            tensors[k] = v.half() if v.is_floating_point() else v
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, **qcfg}
    cfg["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def gptq_base(tmp_path_factory: pytest.TempPathFactory, base16: Path) -> Path:
    gen = torch.Generator().manual_seed(5)

    def pack(w: torch.Tensor) -> dict[str, torch.Tensor]:
        return gptq_pack(w, 16, torch.randperm(w.shape[1], generator=gen))

    qcfg = {"bits": 4, "group_size": 16, "desc_act": True, "sym": False, "checkpoint_format": "gptq"}
    return save_int_packed(base16, tmp_path_factory.mktemp("gptq") / "gptq", "gptq", pack, qcfg)


@pytest.fixture(scope="session")
def awq_base(tmp_path_factory: pytest.TempPathFactory, base16: Path) -> Path:
    WQLinear_GEMM, _ = load_awq_packer()

    def pack(w: torch.Tensor) -> dict[str, torch.Tensor]:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        scales, zeros = minmax_groups(w, 16)
        q = WQLinear_GEMM.from_linear(lin, 4, 16, scales=scales, zeros=zeros)
        return {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales}

    qcfg = {"bits": 4, "group_size": 16, "zero_point": True, "version": "gemm"}
    return save_int_packed(base16, tmp_path_factory.mktemp("awq") / "awq", "awq", pack, qcfg)
