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
