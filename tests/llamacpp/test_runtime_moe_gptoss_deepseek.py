"""Expert LoRA merged into gpt-oss and DeepSeek-V3 GGUF bases (issue 20 item 2), checked in llama.cpp's runtime.

Tiny models (4 experts, 2 layers, random weights) from transformers configs are written as f32 GGUF bases by
llama.cpp's own ``convert_hf_to_gguf.py`` (llama_converter.py; the tests skip where it is not set up):

- gpt-oss (``conversion/gpt_oss.py``): ``experts.gate_up_proj`` (E, in, 2I) transposed, gate rows ``::2`` and
  up rows ``1::2`` into ``ffn_gate_exps`` / ``ffn_up_exps``, ``down_proj`` (E, I, H) transposed into
  ``ffn_down_exps``, biases as ``ffn_*_exps.bias``; its MXFP4 form made by libllama's own
  ``llama_model_quantize`` (MXFP4_MOE: experts MXFP4, GGUF type 39);
- DeepSeek-V3 (arch ``deepseek2``, ``conversion/deepseek.py``): a dense first layer (``ffn_gate/up/down``),
  routed experts stacked into ``ffn_*_exps``, the shared expert as 2-D ``ffn_*_shexp``, MLA attention
  ``attn_q_a`` / ``attn_q_b`` / ``attn_kv_a_mqa`` / ``attn_output`` and ``kv_b_proj`` split per head into
  ``attn_k_b`` (transposed) / ``attn_v_b``.

Adapters are PEFT's own (``target_parameters`` on both expert parameters, attention and shared-expert modules,
rank/alpha patterns, random non-zero B). Each merged tensor equals the base plus PEFT's own ``get_delta_weight``
mapped the converter's way; the merged GGUF's all-position logits in the runtime equal the unmerged PeftModel's
within the base's own noise, while the adapter moves them far more.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_converter import convert_with_llama_cpp, converter
from llamacpp_support import TOL, assert_merged_runs_like_peft, hf_logits, max_diff, run_cli, run_logits
from tiny_models import spread_weights

pytestmark = pytest.mark.filterwarnings("ignore:.*pattern keys did not match")

_COMMON = {"vocab_size": 384, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}  # fmt: skip
_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
#: PEFT target_modules per model: attention (MLA for DeepSeek) and DeepSeek's dense and shared-expert MLPs
_MODULES = {
    "gpt-oss": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "deepseek": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                 "down_proj"],
}  # fmt: skip


def build(arch: str, out: Path) -> tuple[Path, torch.nn.Module]:
    """A seeded tiny model folder. gpt-oss: intermediate 96, so no expert matrix is square and every row is whole
    32-value MXFP4 blocks; plain RoPE, not gpt-oss's YaRN, whose fp32 arithmetic in the runtime differs from
    transformers' by ~1e-3 on the base's logits and 0.07 on the merged model's (effect 19), which would hide
    what the merge does (the tensor test below holds the merge to PEFT's ΔW either way). DeepSeek-V3: its
    config.json also says ``scoring_func: sigmoid`` / ``topk_method: noaux_tc`` as DeepSeek-V3's own does
    (transformers always routes so; the converter reads the gating function from there: without it the
    runtime routes by softmax, 0.17 off)."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt-oss":
        cfg = tf.GptOssConfig(**_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=64,
                              rope_parameters={"rope_type": "default", "rope_theta": 150000.0})  # fmt: skip
        model = tf.GptOssForCausalLM(cfg).eval()
    else:
        cfg = tf.DeepseekV3Config(**_COMMON, intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=4,
                                  first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
                                  num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
                                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)  # fmt: skip
        model = tf.DeepseekV3ForCausalLM(cfg).eval()
    spread_weights(model, rest=0.05)
    model.save_pretrained(out)
    if arch == "deepseek":
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "scoring_func": "sigmoid",
                                    "topk_method": "noaux_tc"}))  # fmt: skip
    return out, model


def peft_adapter(arch: str, model: torch.nn.Module, out: Path, mp: pytest.MonkeyPatch) -> torch.nn.Module:
    import peft.utils.transformers_weight_conversion as conversion
    from peft import LoraConfig, get_peft_model

    mp.setattr(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None)
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=_MODULES[arch],
                     target_parameters=_EXPERTS, rank_pattern={"down_proj": 2, "q_b_proj": 2, "v_proj": 2},
                     alpha_pattern={"o_proj": 3.0})  # fmt: skip
    pm = get_peft_model(copy.deepcopy(model), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    pm.save_pretrained(out)
    return pm


@dataclass
class Case:
    arch: str
    folder: Path
    gguf: Path
    model: torch.nn.Module
    peft: torch.nn.Module
    adapter: Path
    want: np.ndarray
    noise: float
    effect: float

    @property
    def tol(self) -> float:
        return max(TOL, 2 * self.noise)


@pytest.fixture(scope="module", params=["gpt-oss", "deepseek"])
def case(request, runtime, tmp_path_factory) -> Case:
    if converter() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not set up here (LORATOOLS_LLAMA_CONVERTER)")
    arch = request.param
    work = tmp_path_factory.mktemp(arch)
    folder, model = build(arch, work / "base")
    gguf = convert_with_llama_cpp(folder, work / "base.gguf")
    base_logits = hf_logits(model)
    noise = max_diff(run_logits(gguf).ok(), base_logits)
    assert noise < 5e-5, f"{arch}: the GGUF base itself is {noise} off"  # measured 4e-6 (both)
    with pytest.MonkeyPatch.context() as mp:
        pm = peft_adapter(arch, model, work / "lora", mp)
    want = hf_logits(pm)
    return Case(arch, folder, gguf, model, pm, work / "lora", want, noise, max_diff(want, base_logits))


def peft_deltas(case: Case) -> dict[str, np.ndarray]:
    """GGUF tensor name -> PEFT's own ΔW in the GGUF tensor's PyTorch layout, split the converter's way: expert
    parameters from ParamWrapper.get_delta_weight, modules from their LoraLayer's get_delta_weight."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    from loratools.formats.gguf.names import _name_map

    names = _name_map("gpt-oss" if case.arch == "gpt-oss" else "deepseek2", 2)
    cfg = case.model.config
    out: dict[str, np.ndarray] = {}
    for name, module in case.peft.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        delta = module.get_delta_weight("default").detach().float().numpy()
        layer = int(name.split("layers.")[1].split(".")[0])
        if isinstance(module, ParamWrapper):
            if case.arch == "gpt-oss":  # (E, in, out) -> (E, out, in); gate_up columns interleave
                delta = delta.transpose(0, 2, 1)
                if module.parameter_name == "gate_up_proj":
                    out[f"blk.{layer}.ffn_gate_exps.weight"] = delta[:, ::2]
                    out[f"blk.{layer}.ffn_up_exps.weight"] = delta[:, 1::2]
                    continue
            elif module.parameter_name == "gate_up_proj":  # DeepSeek (E, 2I, in), gate rows first
                half = delta.shape[1] // 2
                out[f"blk.{layer}.ffn_gate_exps.weight"] = delta[:, :half]
                out[f"blk.{layer}.ffn_up_exps.weight"] = delta[:, half:]
                continue
            out[f"blk.{layer}.ffn_down_exps.weight"] = delta
        elif name.endswith("kv_b_proj"):  # the converter's MLA split (DeepseekV2Model.modify_tensors)
            nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
            kv_b = delta.reshape(cfg.num_attention_heads, nope + v, -1)
            out[f"blk.{layer}.attn_k_b.weight"] = kv_b[:, :nope].transpose(0, 2, 1)
            out[f"blk.{layer}.attn_v_b.weight"] = kv_b[:, nope:]
        else:
            stem = name.split("base_model.model.", 1)[-1].removeprefix("model.").removeprefix("base_model.model.")
            out[names.get_name(f"model.{stem}" if not stem.startswith("model.") else stem) + ".weight"] = delta
    return out


def _tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist())
            for t in gguf.GGUFReader(path).tensors}  # fmt: skip


def test_merged_tensors_are_base_plus_peft_delta(case):
    """Every touched tensor of the f32 merge is the base plus PEFT's own ΔW mapped as the converter maps the
    weight (gpt-oss's interleaved gate/up, DeepSeek's per-head k_b/v_b split); every other tensor unchanged."""
    out = case.gguf.parent / "merged.gguf"
    code, _, err = run_cli(["merge", case.gguf, case.adapter, "-o", out, "--overwrite", "--verify"])
    assert code == 0, err
    before, after, deltas = _tensors(case.gguf), _tensors(out), peft_deltas(case)
    expected = {"gpt-oss": {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps",
                            "ffn_down_exps"},
                "deepseek": {"attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output",
                             "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
                             "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}}[case.arch]  # fmt: skip
    assert {n.split(".")[2] for n in deltas} == expected, sorted(deltas)
    assert sorted(before) == sorted(after)
    for name in before:
        if name not in deltas:
            assert np.array_equal(before[name], after[name]), name
            continue
        got = after[name] - before[name]
        assert got.shape == deltas[name].shape, (name, got.shape, deltas[name].shape)
        assert np.abs(got - deltas[name]).max() < 1e-5 * (1 + np.abs(deltas[name]).max()), name


def test_merged_in_runtime(case):
    assert_merged_runs_like_peft(case, case.adapter, case.gguf.parent / "merged-run.gguf")


def test_gguf_adapter_refuses_experts_and_split_kv_b_in_one_line(case):
    """As a GGUF adapter: experts have no runtime LoRA; DeepSeek's kv_b_proj has no 2-D tensor to attach to."""
    out = case.gguf.parent / "adapter.gguf"
    code, _, err = run_cli(["convert", case.adapter, "--to", "gguf", "--base", case.gguf, "-o", out])
    assert code == 2 and "llama.cpp has no runtime expert LoRA" in err and not out.exists(), err
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1, err
    code, _, err = run_cli(["convert", case.adapter, "--to", "gguf", "--base", case.gguf, "-o", out, "--exclude",
                            r"experts"])  # fmt: skip
    if case.arch == "gpt-oss":
        assert code == 0, err
        return
    assert code == 2 and "without its LoRA hook" in err and "kv_b_proj" in err and "merge" in err, err
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1 and not out.exists(), err
    code, _, err = run_cli(["convert", case.adapter, "--to", "gguf", "--base", case.gguf, "-o", out, "--exclude",
                            r"experts|q_a_proj|q_b_proj|kv_a_proj"])  # fmt: skip
    assert code == 2 and "attn_k_b" in err and "kv_b_proj" in err and "merge" in err, err
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1 and not out.exists(), err


def test_mla_pairs_the_runtime_ignores(case, tmp_path):
    """The finding behind ``experts.UNAPPLIED``: a GGUF adapter on DeepSeek's attn_q_a / attn_q_b / attn_kv_a_mqa
    loads in llama.cpp and leaves the logits at the base's (written here with the gguf package, by hand)."""
    import gguf
    from peft import LoraConfig, get_peft_model

    if case.arch != "deepseek":
        pytest.skip("DeepSeek's MLA only")
    torch.manual_seed(3)
    pm = get_peft_model(copy.deepcopy(case.model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                              target_modules=["q_a_proj"])).eval()  # fmt: skip
    w = gguf.GGUFWriter(tmp_path / "q_a.gguf", "deepseek2")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 0.0)
    for name, module in pm.base_model.model.named_modules():
        if name.endswith("q_a_proj") and hasattr(module, "lora_A"):
            layer = int(name.split("layers.")[1].split(".")[0])
            a = module.lora_A["default"].weight.detach().float().numpy()
            b = (module.lora_B["default"].weight * module.scaling["default"]).detach().float().numpy()
            w.add_tensor(f"blk.{layer}.attn_q_a.weight.lora_a", a)
            w.add_tensor(f"blk.{layer}.attn_q_a.weight.lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    effect = max_diff(hf_logits(pm), hf_logits(case.model))
    unchanged = max_diff(run_logits(case.gguf, tmp_path / "q_a.gguf").ok(), run_logits(case.gguf).ok())
    assert effect > 0.1 and unchanged == 0.0, (effect, unchanged)


def test_attention_and_shared_experts_as_gguf_adapter(case):
    """What a GGUF adapter can carry runs in the runtime: gpt-oss q/k/v/o; DeepSeek's attn_output, the dense MLP
    and the 2-D shared expert (not kv_b_proj, q_a/q_b/kv_a_mqa nor the routed experts: merged only)."""
    import peft.utils.transformers_weight_conversion as conversion
    from peft import LoraConfig, get_peft_model

    modules = [m for m in _MODULES[case.arch] if m not in ("kv_b_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa")]
    torch.manual_seed(2)
    cfg = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=modules,
                     rank_pattern={"o_proj": 2})  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None)
        pm = get_peft_model(copy.deepcopy(case.model), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    folder, out = case.gguf.parent / "attn-lora", case.gguf.parent / "attn.gguf"
    pm.save_pretrained(folder)
    want = hf_logits(pm)
    code, _, err = run_cli(["convert", folder, "--to", "gguf", "--base", case.gguf, "-o", out, "--overwrite"])
    assert code == 0, err
    effect = max_diff(want, hf_logits(case.model))
    diff = max_diff(run_logits(case.gguf, out).ok(), want)
    assert effect > 50 * case.tol and diff < case.tol, (diff, effect)


def _gguf_tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_mxfp4_experts_stay_mxfp4(case):
    """gpt-oss's MXFP4 form as libllama's ``llama_model_quantize`` writes it (MXFP4_MOE: experts MXFP4, attention
    Q8_0). The gguf package's MXFP4 encoder gives libllama's own bytes from the same f32 experts, and its
    decode/encode round trip is byte-stable; the merge keeps every expert tensor MXFP4 and writes exactly the
    package's encoding of the dequantized base plus PEFT's ΔW; in the runtime the merged model is far nearer
    PEFT over the dequantized base than the unmerged base is."""
    import gguf
    from llama_quantize import quantize

    if case.arch != "gpt-oss":
        pytest.skip("gpt-oss's MXFP4 experts only")
    mx = gguf.GGMLQuantizationType.MXFP4
    base = quantize(case.gguf, case.gguf.parent / "base-mxfp4.gguf", "MXFP4_MOE")
    f32, before = _gguf_tensors(case.gguf), _gguf_tensors(base)
    exps = [n for n in before if n.endswith("_exps.weight")]
    assert exps and all(before[n].tensor_type == mx for n in exps)
    for name in exps:
        stored = np.array(before[name].data)
        values = np.array(f32[name].data, dtype=np.float32)
        assert np.array_equal(gguf.quants.quantize(values, mx), stored), name  # the package's encoder = ggml's
        assert np.array_equal(gguf.quants.quantize(gguf.quants.dequantize(stored, mx), mx), stored), name
    out = case.gguf.parent / "merged-mxfp4.gguf"
    code, text, err = run_cli(["merge", base, case.adapter, "-o", out, "--overwrite", "--verify"])
    assert code == 0, err
    after, deltas = _gguf_tensors(out), peft_deltas(case)
    for name in exps:
        assert after[name].tensor_type == mx, (name, after[name].tensor_type)
        want = gguf.quants.dequantize(np.array(before[name].data), mx).reshape(deltas[name].shape) + deltas[name]
        assert np.array_equal(np.array(after[name].data), gguf.quants.quantize(want.astype(np.float32), mx)), name
    ref = _dequantized_gpt_oss(case, base)
    with pytest.MonkeyPatch.context() as mp:
        want = _peft_over(ref, case.adapter, mp)
    merged = np.abs(run_logits(out).ok() - want).max(-1)
    unmerged = np.abs(run_logits(base).ok() - want).max(-1)
    assert np.isfinite(merged).all() and np.median(merged) < np.median(unmerged) / 5, (merged, unmerged)


def _dequantized_gpt_oss(case: Case, path: Path) -> torch.nn.Module:
    """The gpt-oss model holding ``path``'s weights as the runtime sees them (dequantized; experts transposed
    back and gate/up re-interleaved into gate_up_proj)."""
    import gguf

    from loratools.formats.gguf.names import _name_map

    tensors = {n: gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(t.shape[::-1].tolist())
               for n, t in _gguf_tensors(path).items()}  # fmt: skip
    names = _name_map("gpt-oss", 2)
    model = copy.deepcopy(case.model)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".mlp.experts." in key:
                layer = key.split("layers.")[1].split(".")[0]
                if key.endswith("gate_up_proj"):
                    p[:, :, ::2] = torch.from_numpy(tensors[f"blk.{layer}.ffn_gate_exps.weight"]).transpose(1, 2)
                    p[:, :, 1::2] = torch.from_numpy(tensors[f"blk.{layer}.ffn_up_exps.weight"]).transpose(1, 2)
                elif key.endswith("down_proj"):
                    p.copy_(torch.from_numpy(tensors[f"blk.{layer}.ffn_down_exps.weight"]).transpose(1, 2))
                continue  # biases stay F32
            stem, _, suffix = key.rpartition(".")
            gguf_name = names.get_name(stem)
            if gguf_name is not None and f"{gguf_name}.{suffix}" in tensors:
                p.copy_(torch.from_numpy(np.array(tensors[f"{gguf_name}.{suffix}"], dtype=np.float32)).reshape(p.shape))
    return model.eval()


def _peft_over(model: torch.nn.Module, adapter: Path, mp: pytest.MonkeyPatch) -> np.ndarray:
    import peft.utils.transformers_weight_conversion as conversion
    from peft import PeftModel

    mp.setattr(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None)
    return hf_logits(PeftModel.from_pretrained(model, str(adapter)).eval())


def test_per_expert_deepseek_adapter_merges_alike(case):
    """DeepSeek's adapter as per-expert modules (``experts.{e}.gate_proj/up_proj/down_proj``, what vLLM loads and
    transformers-4 PEFT wrote) merges to the tensors of its target_parameters form and runs alike."""
    from test_runtime_moe import per_expert

    if case.arch != "deepseek":
        pytest.skip("gpt-oss is served with 3-D experts: no per-expert form (convert --to vllm-moe refuses it)")
    folder = per_expert(case.adapter, case.gguf.parent / "per-expert")
    a, b = case.gguf.parent / "pe-fused.gguf", case.gguf.parent / "pe-split.gguf"
    for adapter, out in ((case.adapter, a), (folder, b)):
        code, _, err = run_cli(["merge", case.gguf, adapter, "-o", out, "--overwrite", "--verify"])
        assert code == 0, err
    fused, split = _tensors(a), _tensors(b)
    assert sorted(fused) == sorted(split)
    assert all(np.abs(fused[n] - split[n]).max() < 1e-6 for n in fused)
    assert max_diff(run_logits(b).ok(), case.want) < case.tol


def test_deepseek_writer_matches_the_converter(case):
    """tests/moe_gguf.write_deepseek_gguf (the converter-free base of test_gguf_deepseek_writer.py and the hostile
    cases) writes llama.cpp's converter's tensors exactly: names, shapes, the kv_b split, the stacking."""
    import gguf
    from moe_gguf import write_deepseek_gguf

    if case.arch != "deepseek":
        pytest.skip("the DeepSeek writer only")
    ours = write_deepseek_gguf(case.folder, case.gguf.parent / "ours.gguf")
    a = {t.name: np.array(t.data) for t in gguf.GGUFReader(case.gguf).tensors}
    b = {t.name: np.array(t.data) for t in gguf.GGUFReader(ours).tensors}
    assert sorted(a) == sorted(b) and all(np.array_equal(a[n], b[n]) for n in a)
