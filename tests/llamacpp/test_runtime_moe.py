"""Expert LoRA merged into GGUF MoE bases (issue 20 item 2, issue 22 §4), checked in llama.cpp's own runtime.

llama.cpp has no runtime expert LoRA, so an expert adapter reaches it merged: each expert's ΔW goes into its
slice of the stacked ``blk.L.ffn_{gate,up,down}_exps`` tensor. Tiny Qwen3-MoE and Mixtral models (4 experts,
2 layers) from transformers configs are written as GGUF bases by llama.cpp's own ``convert_hf_to_gguf.py``
(where it is set up: llama_converter.py) and by hf_to_gguf.py; the two give identical tensors. Adapters:
PEFT ``target_parameters`` on both expert parameters plus q/k/v/o (rank and alpha patterns), and the same
adapter as per-expert modules (``experts.{e}.gate_proj`` / Mixtral ``w1/w3/w2``). The merged GGUF's
all-position logits in the runtime equal PEFT's unmerged model within the base's own noise, while the adapter
moves them far more; F16 and Q8_0 bases are requantized tensor by tensor to the ``gguf`` package's own bytes.
A GGUF *adapter* with expert modules stays refused with one line that says: merge; the attention part alone is a GGUF
adapter the runtime applies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_to_gguf import convert
from llama_converter import convert_with_llama_cpp, converter
from llamacpp_support import TOL, assert_merged_runs_like_peft, hf_logits, max_diff, run_cli, run_logits
from tiny_models import build

from loratools.files.safetensors_file import load_file, save_file

pytestmark = pytest.mark.filterwarnings("ignore:.*pattern keys did not match")

ARCHS = ["qwen3moe", "mixtral"]
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@dataclass
class MoeCase:
    arch: str
    folder: Path
    gguf: Path
    model: torch.nn.Module
    peft: torch.nn.Module
    adapters: dict[str, Path]  # kind -> adapter folder
    want: np.ndarray
    noise: float
    effect: float

    @property
    def tol(self) -> float:
        return max(TOL, 2 * self.noise)


def expert_peft(model: torch.nn.Module, out: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """PEFT target_parameters on the experts + q/k/v/o, random non-zero B, rank and alpha patterns; PEFT's
    transformers-5 MoE retargeting switched off (it rewrites module targets on these models)."""
    import peft.utils.transformers_weight_conversion as conversion
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None)
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=_ATTN, target_parameters=_EXPERTS,
                     rank_pattern={"down_proj": 2, "v_proj": 2}, alpha_pattern={"o_proj": 3.0})  # fmt: skip
    pm = get_peft_model(copy.deepcopy(model), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    pm.save_pretrained(out)
    return pm


def per_expert(adapter: Path, out: Path) -> Path:
    """The adapter as per-expert PEFT modules (what transformers-4 PEFT wrote), no loratools record on it."""
    code, _, err = run_cli(["convert", adapter, "--to", "vllm-moe", "-o", out])
    assert code == 0, err
    tensors, meta = load_file(out / "adapter_model.safetensors")
    meta.pop("loratools.experts", None)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata=meta)
    assert any(".experts.3." in k for k in tensors), sorted(tensors)[:5]
    return out


def _converted(folder: Path, dst: Path, how: str, outtype: str = "f32") -> Path:
    if how == "llama.cpp":
        if converter() is None:
            pytest.skip("llama.cpp's convert_hf_to_gguf.py is not set up here (LORATOOLS_LLAMA_CONVERTER)")
        return convert_with_llama_cpp(folder, dst, outtype)
    return convert(folder, dst, outtype)


@pytest.fixture(scope="module", params=[(a, c) for a in ARCHS for c in ("llama.cpp", "ours")], ids=str)
def case(request, runtime, tmp_path_factory) -> MoeCase:
    arch, how = request.param
    work = tmp_path_factory.mktemp(f"{arch}-{how}")
    folder, model = build(arch, work / "base")
    gguf = _converted(folder, work / "base.gguf", how)
    base_logits = hf_logits(model)
    noise = max_diff(run_logits(gguf).ok(), base_logits)
    assert noise < 5e-5, f"{arch}: the GGUF base itself is {noise} off"
    with pytest.MonkeyPatch.context() as mp:
        pm = expert_peft(model, work / "lora", mp)
    want = hf_logits(pm)
    adapters = {"target_parameters": work / "lora", "per-expert": per_expert(work / "lora", work / "per-expert")}
    return MoeCase(arch, folder, gguf, model, pm, adapters, want, noise, max_diff(want, base_logits))


def test_converters_agree(case):
    """hf_to_gguf.py writes the MoE bases tensor for tensor as llama.cpp's converter does (stacked, no permutation)."""
    import gguf

    if converter() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not set up here (LORATOOLS_LLAMA_CONVERTER)")
    ours = convert(case.folder, case.gguf.parent / "ours.gguf")
    real = convert_with_llama_cpp(case.folder, case.gguf.parent / "real.gguf")
    a = {t.name: np.array(t.data) for t in gguf.GGUFReader(real).tensors}
    b = {t.name: np.array(t.data) for t in gguf.GGUFReader(ours).tensors}
    assert sorted(a) == sorted(b) and any(n.endswith("ffn_gate_exps.weight") for n in a)
    assert all(np.array_equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("kind", ["target_parameters", "per-expert"])
def test_merged_moe_in_runtime(case, kind):
    assert_merged_runs_like_peft(case, case.adapters[kind], case.gguf.parent / f"merged-{kind}.gguf", "--verify")


def test_expert_gguf_adapter_is_refused_with_one_line(case):
    """No runtime expert LoRA in llama.cpp: convert --to gguf refuses, validate --target llama.cpp says merge."""
    out = case.gguf.parent / "adapter.gguf"
    code, _, err = run_cli(["convert", case.adapters["target_parameters"], "--to", "gguf", "--base", case.gguf,
                            "-o", out])  # fmt: skip
    assert code == 2 and "llama.cpp has no runtime expert LoRA" in err and "loratools merge BASE.gguf" in err, err
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1 and not out.exists()
    code, text, _ = run_cli(["validate", case.adapters["per-expert"], "--target", "llama.cpp"])
    assert code == 1 and "no runtime expert LoRA" in text and "merge" in text, text


def test_attention_adapter_in_runtime(case):
    """The attention part of a MoE model as a GGUF adapter the runtime applies: q/k/v/o map as in Qwen3 / Llama
    (Mixtral's Q/K rows permuted; Qwen3-MoE's q_norm/k_norm take no LoRA)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    cfg = LoraConfig(r=4, lora_alpha=6, use_rslora=True, init_lora_weights=False, target_modules=_ATTN,
                     rank_pattern={"k_proj": 2})  # fmt: skip
    pm = get_peft_model(copy.deepcopy(case.model), cfg).eval()
    folder, out = case.gguf.parent / "attn-lora", case.gguf.parent / "attn.gguf"
    pm.save_pretrained(folder)
    want = hf_logits(pm)
    code, _, err = run_cli(["convert", folder, "--to", "gguf", "--base", case.gguf, "-o", out, "--overwrite"])
    assert code == 0, err
    effect = max_diff(want, hf_logits(case.model))
    diff = max_diff(run_logits(case.gguf, out).ok(), want)
    assert effect > 50 * case.tol and diff < case.tol, (diff, effect)


def _peft_expert_deltas(pm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GGUF stacked tensor name -> PEFT's own ΔW (E, out, in), from each ParamWrapper's get_delta_weight."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, module in pm.base_model.model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        delta = module.get_delta_weight("default").detach().float()
        if module.parameter_name == "gate_up_proj":
            half = delta.shape[1] // 2
            out[f"blk.{layer}.ffn_gate_exps.weight"] = delta[:, :half]
            out[f"blk.{layer}.ffn_up_exps.weight"] = delta[:, half:]
        else:
            out[f"blk.{layer}.ffn_down_exps.weight"] = delta
    return out


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_requantized_experts(case, outtype):
    """F16 / Q8_0 bases: each merged expert tensor keeps its type and holds its dequantized base plus PEFT's ΔW
    to one step of that type (the bytes themselves are held to the gguf package's encoder by --verify and
    tests/gguf); the merged model runs, within the quantized base's own distance of PEFT."""
    import gguf

    base = convert(case.folder, case.gguf.parent / f"base-{outtype}.gguf", outtype)
    out = case.gguf.parent / f"merged-{outtype}.gguf"
    code, _, err = run_cli(["merge", base, case.adapters["target_parameters"], "-o", out, "--overwrite"])
    assert code == 0, err
    before = {t.name: t for t in gguf.GGUFReader(base).tensors}
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    deltas = _peft_expert_deltas(case.peft)
    assert deltas and set(deltas) <= set(after)
    for name, delta in deltas.items():
        old, new = before[name], after[name]
        assert new.tensor_type == old.tensor_type, name
        want = gguf.quants.dequantize(old.data, old.tensor_type).reshape(delta.shape) + delta.numpy()
        got = gguf.quants.dequantize(new.data, new.tensor_type).reshape(delta.shape)
        if outtype == "f16":  # the nearest F16 (one ulp where PEFT's fp32 ΔW rounds the other way)
            step = np.spacing(np.abs(want).astype(np.float16)).astype(np.float32)
        else:  # one Q8_0 step of each 32-value block
            blocks = np.abs(want).reshape(*want.shape[:-1], -1, 32).max(-1, keepdims=True) / 127
            step = np.broadcast_to(blocks, (*blocks.shape[:-1], 32)).reshape(want.shape)
        assert (np.abs(got - want) <= step + 1e-7).all(), (name, float(np.abs(got - want).max()))
    # in the runtime: held loosely against PEFT over the base's own dequantized weights. Rounding the merged
    # tensors to their type (each within half a step of its ideal value, checked above), and the runtime's
    # rounding of activations, flip a MoE's top-k routing where two experts' router scores nearly tie, and a
    # strong adapter's merged weights make more ties: seen in transformers alone (the merged file's own weights
    # against PEFT) Q8_0 Mixtral 3.25 where rounding the base moved 0.13, F16 0.05 where the base moved 0.004
    ref = dequantized(case, base)
    with pytest.MonkeyPatch.context() as mp:
        want = peft_over(ref, case.adapters["target_parameters"], mp)
    merged = np.abs(run_logits(out).ok() - want).max(-1)
    unmerged = np.abs(run_logits(base).ok() - want).max(-1)
    assert np.isfinite(merged).all() and np.median(merged) < np.median(unmerged) / 5, (outtype, merged, unmerged)


def dequantized(case: MoeCase, gguf_path: Path) -> torch.nn.Module:
    """The Hugging Face model holding ``gguf_path``'s weights as the runtime sees them (dequantized, experts
    unstacked, Llama's Q/K rows un-permuted)."""
    import gguf
    from hf_to_gguf import llama_permute
    from transformers import AutoModelForCausalLM

    from loratools.formats.gguf.names import _name_map

    arch = gguf.GGUFReader(gguf_path).fields["general.architecture"].contents()
    cfg = case.model.config
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    names = _name_map(arch, cfg.num_hidden_layers)
    state = {}
    for key, value in load_file(case.folder / "model.safetensors")[0].items():
        stem, expert = key.removesuffix(".weight"), None
        parts = stem.split(".")
        if "experts" in parts:  # model.layers.L.<box>.experts.E.<proj>: slice E of the stacked tensor
            i = parts.index("experts")
            expert, stem = int(parts[i + 1]), ".".join(parts[: i + 1] + parts[i + 2 :])
        t = tensors[names.get_name(stem, try_suffixes=(".weight", ".bias")) + key[len(key.removesuffix(".weight")) :]]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist())
        w = w if expert is None else w[expert]
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in key else cfg.num_key_value_heads
            perm = llama_permute(np.arange(w.shape[0]), heads)
            w = w[np.argsort(perm)]
        state[key] = torch.from_numpy(np.array(w, dtype=np.float32)).reshape(value.shape)
    folder = gguf_path.parent / f"{gguf_path.stem}-hf"
    case.model.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def peft_over(model: torch.nn.Module, adapter: Path, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    import peft.utils.transformers_weight_conversion as conversion
    from peft import PeftModel

    monkeypatch.setattr(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None)
    return hf_logits(PeftModel.from_pretrained(model, str(adapter)).eval())
