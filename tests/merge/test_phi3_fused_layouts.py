"""An adapter trained on split projections (q_proj/k_proj/v_proj, gate_proj/up_proj) merged into a Phi-3
checkpoint whose weights are fused (qkv_proj, gate_up_proj), and a fused-trained adapter into a Llama-layout
(split) copy of it (issue 22 §4; checkpoint/fused_keymap.py). Oracle: PEFT's unmerged model on the layout the
adapter was trained on; the merged checkpoint, read back into that layout's model, gives its logits (<= 1e-5 fp32)
after a parity check that the two layouts are one model and that each adapter moves the logits far more."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from models import run_cli

from loratools.files.safetensors_file import load_file, save_file

TOL = 1e-5
VOCAB = 64


def _phi3() -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Phi3ForCausalLM(cfg).eval()


def _llama_twin(phi: torch.nn.Module) -> torch.nn.Module:
    """The same network as a LlamaForCausalLM: qkv_proj and gate_up_proj split by rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi.config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=getattr(c, "rope_theta", 10000.0), pad_token_id=0,
        tie_word_embeddings=False,
    )
    llama = LlamaForCausalLM(cfg).eval()
    llama.load_state_dict(split_state(phi.state_dict(), c))
    return llama


def split_state(sd: dict[str, torch.Tensor], c) -> dict[str, torch.Tensor]:  # noqa: ANN001
    q = c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    out = {}
    for k, v in sd.items():
        if k.endswith("qkv_proj.weight"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), torch.split(v, [q, kv, kv]), strict=True):
                out[k.replace("qkv_proj", name)] = part.clone()
        elif k.endswith("gate_up_proj.weight"):
            gate, up = v.chunk(2)
            out[k.replace("gate_up_proj", "gate_proj")] = gate.clone()
            out[k.replace("gate_up_proj", "up_proj")] = up.clone()
        else:
            out[k] = v.clone()
    return out


def fuse_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    parts = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    out = {k: v for k, v in sd.items() if not any(p in k for p in parts)}
    for k in sd:
        if k.endswith("q_proj.weight"):
            out[k.replace("q_proj", "qkv_proj")] = torch.cat([sd[k], sd[k.replace("q_proj", "k_proj")],
                                                               sd[k.replace("q_proj", "v_proj")]])
        if k.endswith("gate_proj.weight"):
            out[k.replace("gate_proj", "gate_up_proj")] = torch.cat([sd[k], sd[k.replace("gate_proj", "up_proj")]])
    return out


def _ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits.float()


def _peft(model: torch.nn.Module, targets: list[str], folder: Path, **kw):  # noqa: ANN003, ANN202
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          init_lora_weights=False, **kw)).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    pm.save_pretrained(str(folder))
    return pm


def _checkpoint(model: torch.nn.Module, sd: dict[str, torch.Tensor], folder: Path) -> Path:
    model.config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    phi = _phi3()
    llama = _llama_twin(phi)
    parity = float((_logits(phi) - _logits(llama)).abs().max())
    assert parity <= TOL, f"the Llama-layout copy is not the same network ({parity:.3g})"
    return phi, llama


def _moved(pm, base) -> None:  # noqa: ANN001
    moved = float((_logits(pm) - _logits(base)).abs().max())
    assert moved > 1000 * TOL, f"the adapter barely moves the logits ({moved:.3g})"


def test_split_trained_adapter_into_fused_phi3(models, tmp_path: Path) -> None:  # noqa: ANN001
    phi, llama = models
    targets = ["q_proj", "v_proj", "k_proj", "gate_proj", "up_proj", "o_proj"]
    pm = _peft(llama, targets, tmp_path / "lora", rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3})
    _moved(pm, llama)
    base = _checkpoint(phi, phi.state_dict(), tmp_path / "phi3")
    code, _, err = run_cli(["merge", base, tmp_path / "lora", "-o", tmp_path / "merged", "--allow-other-base"])
    assert code == 0, err
    merged = load_file(tmp_path / "merged" / "model.safetensors")[0]
    assert any(k.endswith("qkv_proj.weight") for k in merged) and not any(k.endswith("q_proj.weight") for k in merged)
    got = copy.deepcopy(llama)
    got.load_state_dict(split_state(merged, phi.config))
    err_ = float((_logits(got) - _logits(pm)).abs().max())
    assert err_ <= TOL, f"merged logits differ from PEFT's by {err_:.3g}"


def test_fused_trained_adapter_into_split_copy(models, tmp_path: Path) -> None:  # noqa: ANN001
    phi, llama = models
    pm = _peft(phi, ["qkv_proj", "gate_up_proj", "o_proj"], tmp_path / "lora")
    _moved(pm, phi)
    base = _checkpoint(llama, llama.state_dict(), tmp_path / "llama")
    code, _, err = run_cli(["merge", base, tmp_path / "lora", "-o", tmp_path / "merged", "--allow-other-base"])
    assert code == 0, err
    merged = load_file(tmp_path / "merged" / "model.safetensors")[0]
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in merged)
    got = copy.deepcopy(phi)
    got.load_state_dict(fuse_state(merged))
    err_ = float((_logits(got) - _logits(pm)).abs().max())
    assert err_ <= TOL, f"merged logits differ from PEFT's by {err_:.3g}"


def test_dora_on_a_fused_module_is_refused_in_one_line(models, tmp_path: Path) -> None:  # noqa: ANN001
    phi, llama = models
    _peft(phi, ["qkv_proj"], tmp_path / "lora", use_dora=True)
    base = _checkpoint(llama, llama.state_dict(), tmp_path / "llama")
    code, _, err = run_cli(["merge", base, tmp_path / "lora", "-o", tmp_path / "merged", "--allow-other-base"])
    assert code != 0 and "Traceback" not in err and "qkv_proj" in err and "DoRA" in err, err
    assert not (tmp_path / "merged").exists()
    assert json.loads((base / "config.json").read_text())["model_type"] == "llama"
