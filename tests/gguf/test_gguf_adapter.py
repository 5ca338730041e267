"""GGUF adapters: what we write is what llama.cpp's loader and graph apply (ΔW rebuilt from the file with
the gguf package's reader and the runtime's scale rule equals PEFT's get_delta_weight after the base's own
conversion rewrites), and it reads back to the same ΔW."""

from __future__ import annotations

import pytest
import torch
from gguf_support import FIXTURES, GGUF, llama_permute, read_gguf, runtime_deltas

from loratools import load_adapter
from loratools.errors import UnsupportedError, UsageError
from loratools.formats.registry import get_format

PEFT = FIXTURES / "peft"
BASES = FIXTURES / "bases"
#: adapter fixture -> base kind; kohya-patterns is llama-patterns written as kohya (per-module alphas)
CASES = {
    "llama-lora": "llama",
    "llama-rslora": "llama",
    "llama-patterns": "llama",
    "llama-embed": "llama",
    "gpt2-lora": "gpt2",
}


def peft_deltas(adapter: str, kind: str) -> tuple[dict[str, torch.Tensor], float]:
    """PEFT's own ΔW per GGUF base tensor (after the converter's rewrites), and how far it moves logits."""
    import gguf
    from models import build_model, outputs, sample_inputs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(BASES / kind).eval()
    ref = outputs(base, sample_inputs())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASES / kind), PEFT / adapter).eval()
    moved = float((outputs(model, sample_inputs()) - ref).abs().max())
    cfg = base.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if kind == "llama" else gguf.MODEL_ARCH.GPT2, 2)
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A and "default" not in mod.lora_embedding_A:
            continue
        d = mod.get_delta_weight("default").double()
        if kind == "gpt2" and name.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc"):
            d = d.T  # GPT2Model.modify_tensors transposes Conv1D weights
        if name.endswith("q_proj"):
            d = llama_permute(d, cfg.num_attention_heads, cfg.num_attention_heads)
        elif name.endswith("k_proj"):
            d = llama_permute(d, cfg.num_attention_heads, cfg.num_key_value_heads)
        out[tmap.get_name(name) + ".weight"] = d
    del build_model
    return out, moved


def write(adapter, work, name: str, base, **kw):
    """The gguf writer as convert calls it: a Hugging Face folder opened (names and tensors), GGUF as a path."""
    from loratools.checkpoint.reader import open_checkpoint

    path = work / f"{name}.gguf"
    base = open_checkpoint(base) if base.is_dir() else base
    get_format("gguf").write(adapter, path, base=base, **kw)
    return path


@pytest.mark.parametrize("case", [*CASES, "kohya-patterns"])
def test_runtime_delta_equals_peft(case, work):
    kind = CASES.get(case, "llama")
    source = "llama-patterns" if case == "kohya-patterns" else case
    if case == "kohya-patterns":
        from loratools.ops.convert import convert

        convert(PEFT / source, "kohya", work / "patterns-kohya.safetensors", kohya_prefix="lora_te_", overwrite=True)
        adapter = load_adapter(work / "patterns-kohya.safetensors", base=BASES / kind)
        assert len({m.alpha / m.rank for m in adapter.modules.values()}) > 1  # per-module scales
    else:
        adapter = load_adapter(PEFT / source, base=BASES / kind)
    expected, moved = peft_deltas(source, kind)
    assert moved > 1e-2  # the adapter changes the outputs far beyond the tolerance below
    base = GGUF / "llama-f32.gguf" if kind == "llama" else BASES / kind
    got = runtime_deltas(write(adapter, work, case, base))
    assert set(got) == set(expected)
    for name, d in expected.items():
        err = float((got[name] - d).abs().max() / d.abs().max())
        assert err < 1e-6, (case, name, err)


def test_metadata_names_shapes_and_types(work):
    adapter = load_adapter(PEFT / "llama-embed", base=BASES / "llama")
    for outtype, types in (("f32", {"F32"}), ("f16", {"F16"}), ("bf16", {"BF16"}), ("q8_0", {"Q8_0", "F16"})):
        fields, tensors = read_gguf(write(adapter, work, f"embed-{outtype}", GGUF / "llama-f32.gguf", outtype=outtype))
        assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
        assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 0.0
        assert {t for _, t in tensors.values()} == types
        a, _ = tensors["token_embd.weight.lora_a"]
        b, _ = tensors["token_embd.weight.lora_b"]
        assert a.shape == (96, 3) and b.shape == (32, 3)  # the loader's token_embd rule: A transposed
        assert tensors["blk.0.attn_q.weight.lora_a"][0].shape == (3, 32)
        assert tensors["blk.1.attn_output.weight.lora_b"][0].shape == (32, 3)


@pytest.mark.parametrize("case", ["llama-rslora", "llama-patterns", "llama-embed", "gpt2-lora"])
def test_round_trip_keeps_every_delta(case, work):
    kind = CASES[case]
    adapter = load_adapter(PEFT / case, base=BASES / kind)
    back = get_format("gguf").read(write(adapter, work, f"rt-{case}", BASES / kind))
    assert set(back.modules) == set(adapter.modules)
    for name, m in adapter.modules.items():
        d, e = m.delta(), back.modules[name].delta()
        assert float((d - e).abs().max() / d.abs().max()) <= 1e-6, name
        assert back.modules[name].fan_in_fan_out == m.fan_in_fan_out


def test_foreign_alpha_is_honoured(work):
    """A file with alpha != 0 (llama.cpp's converter writes lora_alpha) reads with scale alpha/rank."""
    import gguf

    path = work / "foreign.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 6.0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g), torch.randn(48, 4, generator=g)
    w.add_tensor("blk.0.ffn_up.weight.lora_a", a.numpy())
    w.add_tensor("blk.0.ffn_up.weight.lora_b", b.numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    for base in (BASES / "llama", GGUF / "llama-q8_0.gguf"):  # no head counts in the file: the base has them
        back = load_adapter(path, base=base)
        m = back.modules["model.layers.0.mlp.up_proj"]
        assert torch.allclose(m.delta(), 1.5 * b @ a)


@pytest.mark.parametrize(
    ("case", "code"),
    [("llama-dora", "DoRA"), ("llama-bias", "bias"), ("llama-mts", "lm_head"), ("llama-embed", "modules_to_save")],
)
def test_what_gguf_cannot_hold_is_refused(case, code, work):
    adapter = load_adapter(PEFT / case, base=BASES / "llama")
    for key in adapter.replacements:  # a saved full tensor equal to the base's is dropped: make it differ
        adapter.replacements[key] = adapter.replacements[key] + 1
    with pytest.raises(UnsupportedError, match=code) as exc:
        write(adapter, work, case, GGUF / "llama-f32.gguf")
    assert "loratools merge" in (exc.value.hint or "")


def test_tied_output_and_unknown_arch_are_refused(work):
    from loratools.model.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(0)
    head = LoraModule(torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g), alpha=3)
    with pytest.raises(UnsupportedError, match="ties lm_head"):
        write(Adapter({"lm_head": head}), work, "tied", BASES / "gpt2")
    with pytest.raises(UnsupportedError, match="BertModel"):
        write(Adapter({"lm_head": head}), work, "bert", BASES / "bert")
    with pytest.raises(UsageError, match="--base"):
        get_format("gguf").write(Adapter({"lm_head": head}), work / "nobase.gguf")


def test_gguf_base_shape_rule(work):
    """Against a GGUF base every pair is checked with the loader's shape rule before writing."""
    from loratools.model.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(0)
    wrong = LoraModule(torch.randn(2, 32, generator=g), torch.randn(40, 2, generator=g), alpha=3)
    with pytest.raises(UnsupportedError, match="do not fit base tensor blk.0.ffn_up.weight"):
        write(Adapter({"model.layers.0.mlp.up_proj": wrong}), work, "wrong", GGUF / "llama-q8_0.gguf")


def test_plain_adapter_matches_llama_cpps_converter_after_its_scale_rule(work):
    """convert_lora_to_gguf.py writes lora_a = A, lora_b = P·B (Q/K rows permuted) and alpha = lora_alpha;
    ours folds alpha/r into lora_b and writes alpha 0: the same tensors up to that factor."""
    from loratools.formats.gguf.names import load_base

    adapter = load_adapter(PEFT / "llama-lora", base=BASES / "llama")
    _, tensors = read_gguf(write(adapter, work, "plain", GGUF / "llama-f32.gguf"))
    info = load_base(GGUF / "llama-f32.gguf")
    for name, m in adapter.modules.items():
        tensor = info.gguf_name(name)
        b = m.up.float()
        if name.endswith("q_proj"):
            b = llama_permute(b, 4, 4)
        elif name.endswith("k_proj"):
            b = llama_permute(b, 4, 2)
        assert torch.equal(torch.from_numpy(tensors[f"{tensor}.lora_a"][0]), m.down.float())
        assert torch.allclose(torch.from_numpy(tensors[f"{tensor}.lora_b"][0]), b * (m.alpha / m.rank), rtol=1e-6)


def test_alora_invocation_tokens_travel(work):
    adapter = load_adapter(PEFT / "llama-lora")
    adapter.meta["config"] = {**adapter.meta["config"], "alora_invocation_tokens": [5, 17, 3]}
    path = write(adapter, work, "alora", GGUF / "llama-f32.gguf")
    fields, _ = read_gguf(path)
    assert fields["adapter.alora.invocation_tokens"] == [5, 17, 3]
    assert get_format("gguf").read(path).meta["alora_invocation_tokens"] == [5, 17, 3]


def test_untied_output_lora_and_changed_norms(work):
    """lm_head -> output.weight (plain linear rule) on an untied base; a changed norm weight is refused
    because the loader skips *_norm.weight tensors in adapters."""
    from loratools.model.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(0)
    head = LoraModule(torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g), alpha=3)
    _, tensors = read_gguf(write(Adapter({"lm_head": head}), work, "head", GGUF / "llama-q8_0.gguf"))
    assert tensors["output.weight.lora_a"][0].shape == (2, 32) and tensors["output.weight.lora_b"][0].shape == (96, 2)
    norm = Adapter({"lm_head": head}, replacements={"model.norm.weight": torch.full((32,), 2.0)})
    with pytest.raises(UnsupportedError, match="skips norm tensors"):
        write(norm, work, "norm", BASES / "llama")
