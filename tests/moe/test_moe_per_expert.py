"""Per-expert adapters (``experts.{e}.gate_proj/up_proj/down_proj``, DeepSeek-V3 shared experts and dense MLP,
the router as a plain module) merged into checkpoints that hold the experts per expert and fused (3-D), and a
fused-trained adapter into both. Oracle: the PeftModel that trained the adapter on transformers 5, built with
PEFT's gate_proj/up_proj/down_proj -> routed-experts conversion switched off (it would drop the shared-expert and
dense-MLP targets); the merged checkpoints load in transformers and equal it on the logits (<= 1e-5)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from moe_support import TOL, VOCAB, load_model, logits, run_cli, sample_ids

from loratools.files.safetensors_file import load_file, save_file

pytestmark = pytest.mark.filterwarnings("ignore:.*pattern keys did not match")


def deepseek_v3(seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def oracle(model: torch.nn.Module, folder: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A PeftModel over routed experts (target_parameters), shared experts, the dense MLP and the router."""
    import peft.utils.transformers_weight_conversion as conversion
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None)
    cfg = LoraConfig(
        r=2, lora_alpha=5, init_lora_weights=False,
        target_modules=[f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        + [f"shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
    )
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(model), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    pm.save_pretrained(str(folder))
    return pm


def fused_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    """The experts as transformers 5 holds them in memory (3-D gate_up_proj / down_proj), saved as they are."""
    model.save_pretrained(str(folder))
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def per_expert_adapter(fused_adapter: Path, out: Path) -> Path:
    """The adapter as per-expert PEFT modules (what transformers-4 PEFT wrote), no loratools record on it."""
    code, _, err = run_cli(["convert", fused_adapter, "--to", "vllm-moe", "-o", out])
    assert code == 0, err
    tensors, meta = load_file(out / "adapter_model.safetensors")
    meta.pop("loratools.experts")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata=meta)
    assert any(".experts.2.up_proj.lora_B" in k for k in tensors) and not any("base_layer" in k for k in tensors)
    return out


def _check(merged: Path, pm, model) -> None:  # noqa: ANN001
    ids = sample_ids()
    theirs = logits(pm, ids)
    moved = float((theirs - logits(model, ids)).abs().max())
    assert moved > 1000 * TOL, f"the adapter barely moves the logits ({moved:.3g})"
    err = float((logits(load_model(merged), ids) - theirs).abs().max())
    assert err <= TOL, f"merged logits differ from the PeftModel's by {err:.3g}"


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("adapter_kind", ["per-expert", "fused-trained"])
def test_deepseek_v3_shared_experts_router_dense(layout: str, adapter_kind: str, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    model = deepseek_v3()
    pm = oracle(model, tmp_path / "fused-lora", monkeypatch)
    base = tmp_path / "base"
    if layout == "fused":
        fused_checkpoint(model, base)
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in load_file(base / "model.safetensors")[0])
    else:
        model.save_pretrained(str(base))
        assert any(".experts.3.gate_proj.weight" in k for f in base.glob("*.safetensors") for k in load_file(f)[0])
    adapter = tmp_path / "fused-lora"
    if adapter_kind == "per-expert":
        adapter = per_expert_adapter(adapter, tmp_path / "per-expert-lora")
        assert any("shared_experts" in k for k in load_file(adapter / "adapter_model.safetensors")[0])
    merged = tmp_path / "merged"
    code, _, err = run_cli(["merge", base, adapter, "-o", merged])
    assert code == 0, err
    _check(merged, pm, model)


def test_qwen3_moe_per_expert_adapter_into_fused_checkpoint(tmp_path: Path) -> None:
    """A per-expert Qwen3-MoE adapter (PEFT's own conversion is the oracle here: it reads per-expert modules)
    merged into a fused checkpoint: gate and up of one expert go to rows [:I] / [I:] of gate_up_proj[e]."""
    from moe_support import build_moe, moe_peft
    from peft import PeftModel

    model = build_moe("qwen3_moe")
    moe_peft(model, tmp_path / "fused-lora")
    adapter = per_expert_adapter_plain(tmp_path)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    base = fused_checkpoint(model, tmp_path / "base")
    merged = tmp_path / "merged"
    code, _, err = run_cli(["merge", base, adapter, "-o", merged])
    assert code == 0, err
    _check(merged, pm, model)
    assert json.loads((merged / "config.json").read_text())["model_type"] == "qwen3_moe"


def per_expert_adapter_plain(tmp_path: Path) -> Path:
    return per_expert_adapter(tmp_path / "fused-lora", tmp_path / "per-expert-lora")
