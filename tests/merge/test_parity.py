"""Merged checkpoints behave exactly like the unmerged PeftModel, for every kind of module PEFT makes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from merge_support import TOL, assert_parity, load_merged, logits, make_case, models, peft_merged_state, perturb

from loratools import merge
from loratools.files.safetensors_file import load_file

VARIANTS = {
    "linear": dict(kind="llama"),
    "conv1d-gpt2": dict(kind="gpt2"),
    "bert": dict(kind="bert"),
    "embedding": dict(kind="llama", peft_kw={"target_modules": ["embed_tokens", "q_proj", "down_proj"]}),
    "dora": dict(
        kind="llama",
        peft_kw={"use_dora": True, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]},
        mutate=lambda p: perturb(p, "lora_magnitude_vector.default.weight"),
    ),
    "dora-gpt2": dict(
        kind="gpt2", peft_kw={"use_dora": True}, mutate=lambda p: perturb(p, "magnitude_vector.default.weight")
    ),
    "rslora": dict(kind="llama", peft_kw={"use_rslora": True}),
    "patterns": dict(
        kind="llama",
        peft_kw={"rank_pattern": {"v_proj": 2, "layers.1.mlp.up_proj": 6}, "alpha_pattern": {"down_proj": 3}},
    ),
    "bias": dict(kind="bert", peft_kw={"lora_bias": True}, mutate=lambda p: perturb(p, "lora_B.default.bias", 1.0)),
    "modules-to-save": dict(
        kind="llama",
        peft_kw={"modules_to_save": ["lm_head"]},
        mutate=lambda p: perturb(p, "modules_to_save.default.weight"),
    ),
    "sharded-fp32": dict(kind="llama", base_kw={"max_shard_size": "30KB"}),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_unmerged_peft(name: str, tmp_path: Path) -> None:
    case = make_case(tmp_path, **VARIANTS[name])
    out = tmp_path / "merged"
    summary = merge(case.base, [case.adapter], out)
    assert summary.modules_merged > 0 and summary.bytes_written > 0
    assert_parity(out, case)
    # tensors equal PEFT's own merge (PEFT is right for all of these)
    ours = {}
    for f in sorted(out.glob("*.safetensors")):
        ours.update(load_file(f)[0])
    theirs = peft_merged_state(case)
    common = set(ours) & set(theirs)
    assert len(common) >= len(ours) - 1
    for k in sorted(common):
        torch.testing.assert_close(ours[k], theirs[k], atol=2e-6, rtol=1e-5, msg=k)
    # the base's layout is kept
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in case.base.iterdir())


def test_tied_lm_head_is_untied(tmp_path: Path) -> None:
    case = make_case(
        tmp_path,
        "llama",
        model_kw={"tie_word_embeddings": True},
        peft_kw={"target_modules": ["lm_head", "q_proj"]},
    )
    out = tmp_path / "merged"
    summary = merge(case.base, [case.adapter], out)
    assert "lm_head.weight" in summary.untied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = load_file(out / "model.safetensors")[0]
    base = load_file(case.base / "model.safetensors")[0]
    assert torch.equal(tensors["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert_parity(out, case)
    # PEFT's own merge changes the input embeddings too: its logits are off
    peft_merged = copy.deepcopy(case.peft).merge_and_unload()
    assert (logits(peft_merged) - logits(case.peft)).abs().max() > 1e-2


def test_resized_vocabulary_base_layer(tmp_path: Path) -> None:
    model = models.build_model("llama")
    base = models.save_base(model, tmp_path / "base")
    resized = copy.deepcopy(model)
    resized.resize_token_embeddings(models.VOCAB + 8, mean_resizing=False)
    peft = models.make_peft(resized, None, target_modules=["embed_tokens", "lm_head", "q_proj"])
    peft.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=True)
    out = tmp_path / "merged"
    merge(base, [tmp_path / "adapter"], out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == models.VOCAB + 8
    ref, before = logits(peft), logits(resized)
    assert (ref - before).abs().max() >= 100 * TOL
    got = logits(load_merged(out, model))
    assert (got - ref).abs().max() <= TOL


def test_weighted_adapters_with_negative_weight(tmp_path: Path) -> None:
    from peft import PeftModel

    model = models.build_model("llama")
    base = models.save_base(model, tmp_path / "base")
    models.make_peft(model, tmp_path / "a", target_modules=["q_proj", "v_proj"], seed=1)
    models.make_peft(model, tmp_path / "b", target_modules=["v_proj", "down_proj"], r=2, lora_alpha=5, seed=2)
    out = tmp_path / "merged"
    merge(base, [tmp_path / "a", tmp_path / "b"], out, weights=[1.0, -0.5])
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"), adapter_name="a")
    peft.load_adapter(str(tmp_path / "b"), adapter_name="b")
    peft.base_model.set_adapter(["a", "b"])
    for module in peft.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "b" in module.scaling:
            module.scaling["b"] *= -0.5
    peft.eval()
    ref = logits(peft)
    assert (ref - logits(model)).abs().max() >= 100 * TOL
    assert (logits(load_merged(out, model)) - ref).abs().max() <= TOL


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


def test_sharded_bf16_within_one_rounding_step(tmp_path: Path) -> None:
    from peft import PeftModel

    case = make_case(tmp_path, "llama", base_kw={"dtype": torch.bfloat16, "max_shard_size": "20KB"})
    out = tmp_path / "merged"
    merge(case.base, [case.adapter], out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in case.base.iterdir())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((case.base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    exact_model = type(case.model).from_pretrained(str(case.base), dtype=torch.float32)
    exact = PeftModel.from_pretrained(exact_model, str(case.adapter)).merge_and_unload().state_dict()
    ours = {}
    for f in out.glob("*.safetensors"):
        ours.update(load_file(f)[0])
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16
        assert bool(((v.float() - exact[k]).abs() <= _ulp_bf16(exact[k])).all()), k


def test_reshard_by_max_shard_size(tmp_path: Path) -> None:
    case = make_case(tmp_path, "llama")
    out = tmp_path / "merged"
    merge(case.base, [case.adapter], out, max_shard_size="25KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for s in shards:
        assert s == "model-00001-of-00004.safetensors" or (out / s).stat().st_size <= 25_000 + 4096
    assert_parity(out, case)


def test_bin_base_is_written_as_safetensors(tmp_path: Path) -> None:
    model = models.build_model("llama")
    base = tmp_path / "base"
    base.mkdir()
    model.config.save_pretrained(str(base))
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, base / "pytorch_model.bin")
    peft = models.make_peft(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    merge(base, [tmp_path / "adapter"], out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    case = type("C", (), {"peft": peft, "model": model})
    assert_parity(out, case)


def test_single_file_base(tmp_path: Path) -> None:
    case = make_case(tmp_path, "llama")
    folder_out = tmp_path / "merged"
    merge(case.base, [case.adapter], folder_out)
    file_out = tmp_path / "merged.safetensors"
    merge(case.base / "model.safetensors", [case.adapter], file_out)
    a, b = load_file(folder_out / "model.safetensors")[0], load_file(file_out)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 6, 1)
        self.fc = torch.nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("dora", [False, True])
def test_conv_modules(tmp_path: Path, dora: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = ConvNet().eval()
    (tmp_path / "base").mkdir()
    save_file(net.state_dict(), str(tmp_path / "base" / "model.safetensors"))
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["conv", "conv2", "fc"], init_lora_weights=False, use_dora=dora)
    peft = get_peft_model(copy.deepcopy(net), cfg).eval()
    if dora:
        perturb(peft, "lora_magnitude_vector.default.weight")
    peft.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    merge(tmp_path / "base", [tmp_path / "adapter"], out)
    merged = ConvNet().eval()
    merged.load_state_dict(load_file(out / "model.safetensors")[0])
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, before, got = peft(x), net(x), merged(x)
    assert (ref - before).abs().max() >= 100 * TOL
    assert (got - ref).abs().max() <= TOL
