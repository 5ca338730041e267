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
    w = gguf.GGUFWriter(dst, "qwen3moe")
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
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
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
    w = gguf.GGUFWriter(dst, "gpt-oss")
    w.add_block_count(n_layer)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(keep)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["intermediate_size"])
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
