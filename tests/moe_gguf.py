"""The Qwen3-MoE fixture (fixtures/moe/qwen3-moe-bf16: 4 experts, 2 layers) written as a GGUF base the way
llama.cpp's convert_hf_to_gguf.py writes it (conversion/qwen.py ``Qwen2MoeModel.modify_tensors``): names through
``gguf.get_tensor_name_map``, each layer's per-expert weights stacked (``torch.stack(dim=0)``) into
``ffn_{gate,up,down}_exps`` of PyTorch shape (E, out, in). For tests/gguf and the hostile MoE bases: ``experts``
and ``ffn`` (keep the first that many experts / rows of each expert's gate and up) make a base of another size.
No tokenizer: the merge never reads one (tests/llamacpp builds bases the runtime loads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QWEN3_MOE = ROOT / "fixtures" / "moe" / "qwen3-moe-bf16"
QWEN3_MOE_LORA = ROOT / "fixtures" / "moe" / "qwen3-moe-lora"


def _moe_writer(dst: Path, arch: str, cfg: dict, n_layer: int, n_expert: int, expert_ffn: int):  # noqa: ANN202
    """A GGUFWriter with the hyperparameters the Qwen3-MoE and gpt-oss writers share (GQA heads of ``head_dim``)."""
    import gguf

    w = gguf.GGUFWriter(dst, arch)
    w.add_block_count(n_layer)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(n_expert)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(expert_ffn)
    return w


def write_moe_gguf(
    dst: Path, outtype: str = "f32", experts: int | None = None, ffn: int | None = None, flat: bool = False
) -> Path:
    """``flat``: the stacked tensors written 2-D, (E·out, in), as no converter writes them."""
    import json

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((QWEN3_MOE / "config.json").read_text())
    n_layer, n_expert = cfg["num_hidden_layers"], cfg["num_local_experts"]
    keep = experts or n_expert
    tensors = {k: v.float().numpy() for k, v in load_file(str(QWEN3_MOE / "model.safetensors")).items()}
    for i in range(n_layer):
        for part in ("gate_proj", "up_proj", "down_proj"):
            stack = np.stack([tensors.pop(f"model.layers.{i}.mlp.experts.{e}.{part}.weight") for e in range(n_expert)])
            stack = stack[:keep]
            if ffn is not None:
                stack = stack[:, :ffn] if part != "down_proj" else stack[:, :, :ffn]
            stack = stack.reshape(-1, stack.shape[-1]) if flat else stack
            tensors[f"model.layers.{i}.mlp.experts.{part}.weight"] = np.ascontiguousarray(stack)
    w = _moe_writer(dst, "qwen3moe", cfg, n_layer, n_expert, cfg["moe_intermediate_size"])
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, n_layer)
    for name, t in tensors.items():
        new = tmap.get_name(name, try_suffixes=(".weight",))
        assert new is not None, name
        if outtype == "q8_0" and t.ndim >= 2 and t.shape[-1] % 32 == 0:
            w.add_tensor(new, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        elif outtype != "f32" and t.ndim >= 2:
            w.add_tensor(new, t.astype(np.float16))
        else:
            w.add_tensor(new, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


GPT_OSS = ROOT / "fixtures" / "moe" / "gpt-oss-bf16"
GPT_OSS_LORA = ROOT / "fixtures" / "moe" / "gpt-oss-lora"


def write_gpt_oss_gguf(
    dst: Path, outtype: str = "f32", experts: int | None = None, nan_expert: int | None = None
) -> Path:
    """The gpt-oss fixture (fixtures/moe/gpt-oss-bf16: 4 experts, 2 layers) as llama.cpp's converter writes it
    from unquantized experts (conversion/gpt_oss.py ``GptOssModel.modify_tensors``): ``gate_up_proj`` (E, in, 2I)
    transposed and split gate ``::2`` / up ``1::2``, ``down_proj`` transposed, the biases split alike, ``sinks``
    as ``attn_sinks.weight``. ``outtype`` "mxfp4": the expert tensors MXFP4 (the gguf package's encoder, which
    gives libllama's own bytes: tests/llamacpp/test_runtime_moe_gptoss_deepseek.py); ``experts`` keeps the first
    that many; ``nan_expert``: that expert of blk.0.ffn_gate_exps holds a NaN (an MXFP4 E8M0 scale 0xFF)."""
    import json

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((GPT_OSS / "config.json").read_text())
    n_layer = cfg["num_hidden_layers"]
    keep = experts or cfg["num_local_experts"]
    tensors: dict[str, np.ndarray] = {}
    for name, t in load_file(str(GPT_OSS / "model.safetensors")).items():
        x = t.float().numpy()
        if ".mlp.experts." in name:
            x = x[:keep]
            stem = name.rsplit(".", 1)[0]
            if name.endswith("gate_up_proj"):
                x = x.transpose(0, 2, 1)
                tensors[f"{stem}.gate_proj.weight"], tensors[f"{stem}.up_proj.weight"] = x[:, ::2], x[:, 1::2]
            elif name.endswith("gate_up_proj_bias"):
                tensors[f"{stem}.gate_proj.bias"], tensors[f"{stem}.up_proj.bias"] = x[..., ::2], x[..., 1::2]
            elif name.endswith("down_proj"):
                tensors[f"{stem}.down_proj.weight"] = x.transpose(0, 2, 1)
            else:
                tensors[f"{stem}.down_proj.bias"] = x
            continue
        tensors[name + ".weight" if name.endswith("sinks") else name] = x
    w = _moe_writer(dst, "gpt-oss", cfg, n_layer, keep, cfg["intermediate_size"])
    w.add_sliding_window(cfg["sliding_window"])
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, n_layer)
    mx = gguf.GGMLQuantizationType.MXFP4
    for name, t in tensors.items():
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        t = np.ascontiguousarray(t, dtype=np.float32)
        if outtype == "mxfp4" and t.ndim == 3:
            q = gguf.quants.quantize(t, mx)
            if nan_expert is not None and new == "blk.0.ffn_gate_exps.weight":
                q = q.copy()
                q[nan_expert].reshape(-1, 17)[0, 0] = 0xFF  # the E8M0 scale of the expert's first block: NaN
            w.add_tensor(new, q, raw_dtype=mx)
        else:
            if nan_expert is not None and new == "blk.0.ffn_gate_exps.weight":
                t = t.copy()
                t[nan_expert, 0, 0] = np.nan
            w.add_tensor(new, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def build_deepseek(out: Path) -> tuple[Path, Path]:
    """(model folder, PEFT adapter folder) of a seeded tiny DeepSeek-V3 (4 routed experts + 1 shared, a dense first
    layer, MLA with q_lora_rank 32 / kv_lora_rank 32, 4 heads of nope 16 + rope 8, v 16) and a PEFT adapter on its
    routed experts (target_parameters), shared expert, dense MLP and MLA attention, random non-zero B."""
    import copy

    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                              max_position_embeddings=64, first_k_dense_replace=1, n_routed_experts=4,
                              n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=32,
                              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                              tie_word_embeddings=False)  # fmt: skip
    model = tf.DeepseekV3ForCausalLM(cfg).eval()
    model.save_pretrained(out / "base")
    lora = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_parameters=["mlp.experts.gate_up_proj",
                      "mlp.experts.down_proj"], target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                      "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    try:
        import peft.utils.transformers_weight_conversion as conversion

        saved, conversion.convert_peft_config_for_transformers = (
            conversion.convert_peft_config_for_transformers, lambda *a, **k: None)  # fmt: skip
    except ImportError:
        conversion = None
    try:
        get_peft_model(copy.deepcopy(model), lora).save_pretrained(out / "lora")
    finally:
        if conversion is not None:
            conversion.convert_peft_config_for_transformers = saved
    return out / "base", out / "lora"


def write_deepseek_gguf(src: Path, dst: Path, experts: int | None = None, kv_rank: int | None = None,
                        nan: str | None = None) -> Path:  # fmt: skip
    """``src`` (a DeepSeek-V2/V3 folder) as llama.cpp's converter writes it (conversion/deepseek.py
    ``DeepseekV2Model.modify_tensors``): routed experts stacked into ``ffn_*_exps``, shared experts and dense
    layers 2-D, ``kv_b_proj`` viewed (H, nope + v, kv_rank) and split into ``attn_k_b`` (transposed: (H, kv_rank,
    nope)) and ``attn_v_b`` (H, v, kv_rank). ``experts``: keep the first that many; ``kv_rank``: cut the split
    tensors' kv_lora_rank side to that (a base of another model); ``nan``: a GGUF tensor that gets one NaN."""
    import json

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((src / "config.json").read_text())
    n_layer, n_head, n_expert = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["n_routed_experts"]
    keep = experts or n_expert
    nope, v = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    tensors = {k: t.float().numpy() for k, t in load_file(str(src / "model.safetensors")).items()}
    out: dict[str, np.ndarray] = {}
    for name in list(tensors):
        if ".mlp.experts." in name and name.split(".mlp.experts.")[1].split(".")[0].isdigit():
            continue
        x = tensors[name]
        if name.endswith("kv_b_proj.weight"):
            kv_b = x.reshape(n_head, nope + v, x.shape[-1])
            k_b, v_b = kv_b[:, :nope].transpose(0, 2, 1), kv_b[:, nope:]
            if kv_rank is not None:
                k_b, v_b = k_b[:, :kv_rank], v_b[..., :kv_rank]
            out[name.replace("kv_b_proj", "k_b_proj")], out[name.replace("kv_b_proj", "v_b_proj")] = k_b, v_b
            continue
        out[name] = x
    for i in range(cfg["first_k_dense_replace"], n_layer):
        for part in ("gate_proj", "up_proj", "down_proj"):
            keys = [f"model.layers.{i}.mlp.experts.{e}.{part}.weight" for e in range(n_expert)]
            out[f"model.layers.{i}.mlp.experts.{part}.weight"] = np.stack([tensors[k] for k in keys])[:keep]
    w = gguf.GGUFWriter(dst, "deepseek2")
    w.add_block_count(n_layer)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(1)  # MLA converts to MQA (the converter's own note)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(keep)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(cfg["kv_lora_rank"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n_layer)
    for name, t in out.items():
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # -> exp_probs_b.bias
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        t = np.ascontiguousarray(t, dtype=np.float32)
        if new == nan:
            t = t.copy()
            t.reshape(-1)[0] = np.nan
        w.add_tensor(new, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
