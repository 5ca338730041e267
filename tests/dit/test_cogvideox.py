"""CogVideoX LoRAs (issue 21): CogVideoX-Fun's kohya files (``lora_unet__`` + diffusers path, ``lora_te_`` + the T5
path; its merge is W += alpha/rank · up·down, kijai/ComfyUI-CogVideoXWrapper ``lora_utils.merge_lora``) and
ComfyUI-style ``diffusion_model.`` files, merged into a pipeline equal to diffusers' own loader on the diffusers
file loratools writes (CogVideoXPipeline.load_lora_into_transformer + fuse_lora; outputs with the LoRA active),
converted losslessly; the attn1-only names LTX-Video shares told by the base or refused saying what to pass."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import load_adapter, merge, save_adapter
from loratools.errors import UnsupportedError


def tiny_model():
    """A two-block CogVideoXTransformer3DModel with random weights (also tests/dit/test_cogvideox_trainers.py's)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    cfg = T5Config(vocab_size=32, d_model=12, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    return T5EncoderModel(cfg).eval()


def tiny_pipeline(model, t5, folder):
    """A CogVideoXPipeline folder holding ``model`` and ``t5`` (no VAE, scheduler or tokenizer: merges need none)."""
    model.save_pretrained(folder / "transformer")
    t5.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline",
                                                         "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
                                                         "text_encoder": ["transformers", "T5EncoderModel"]}))
    return folder


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def t5():
    return tiny_t5()


@pytest.fixture(scope="module")
def pipeline(model, t5, tmp_path_factory):
    return tiny_pipeline(model, t5, tmp_path_factory.mktemp("cog") / "pipe")


def _linears(model):
    return [(n, x) for n, x in model.named_modules() if isinstance(x, torch.nn.Linear)]


def fun_lora(model, t5=None, prefix="lora_unet__", attn_only=False) -> dict[str, torch.Tensor]:
    """A CogVideoX-Fun file: every Linear, rank and alpha differing per module."""
    g = torch.Generator().manual_seed(1)
    out = {}
    named = [(f"{prefix}{n.replace('.', '_')}", x) for n, x in _linears(model) if not attn_only or ".attn1." in n]
    if t5 is not None:
        named += [(f"lora_te_{n.replace('.', '_')}", x) for n, x in _linears(t5) if "SelfAttention" in n]
    for i, (name, lin) in enumerate(named):
        r = 2 + i % 2
        out[f"{name}.lora_down.weight"] = torch.randn(r, lin.in_features, generator=g) * 0.3
        out[f"{name}.lora_up.weight"] = torch.randn(lin.out_features, r, generator=g) * 0.3
        out[f"{name}.alpha"] = torch.tensor(0.5 + 0.75 * i)
    return out


def _fun_merge(model, state, prefix="lora_unet__"):
    """CogVideoX-Fun's rule: W += alpha / rank * up @ down, per module."""
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for name, _ in _linears(model):
        key = prefix + name.replace(".", "_")
        if f"{key}.lora_up.weight" in state:
            up, down = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"]
            want[f"{name}.weight"] += float(state[f"{key}.alpha"]) / up.shape[1] * up @ down
    return want


def _forward(model):
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 3, 4, 8, 8, generator=g), torch.randn(1, 8, 12, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([10]), return_dict=False)[0]


def test_fun_kohya_merge_equals_its_rule_and_diffusers(model, t5, pipeline, tmp_path):
    from diffusers import CogVideoXPipeline

    path = tmp_path / "fun.safetensors"
    state = fun_lora(model, t5)
    save_file(state, str(path))
    adapter = load_adapter(path)
    assert adapter.meta["dit"] == {"family": "cogvideox", "layout": "kohya"}
    merge(pipeline, [path], tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = _fun_merge(model, state)
    assert set(ours) == set(want)
    assert max(float((ours[k] - want[k]).abs().max()) for k in ours) <= 1e-5
    # the oracle: our diffusers file through diffusers' own loader, LoRA active (outputs) and fused (weights)
    transformer = replace(adapter, modules={k: m for k, m in adapter.modules.items() if k.startswith("transformer.")})
    out = save_adapter(transformer, tmp_path / "diffusers", format="diffusers")
    lora, meta = CogVideoXPipeline.lora_state_dict(str(out), return_lora_metadata=True)  # as load_lora_weights
    assert meta["transformer.alpha_pattern"]  # per-module alphas ride in lora_adapter_metadata
    theirs = copy.deepcopy(model)
    CogVideoXPipeline.load_lora_into_transformer(lora, transformer=theirs, adapter_name="x", metadata=meta)
    merged = copy.deepcopy(model)
    merged.load_state_dict(ours)
    base_out, lora_out, merged_out = _forward(model), _forward(theirs), _forward(merged)
    assert float((lora_out - base_out).abs().max()) > 1e-2  # parity first: the LoRA moves the output
    assert float((merged_out - lora_out).abs().max()) <= 1e-4
    theirs.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    assert max(float((ours[k] - fused[k]).abs().max()) for k in ours) <= 1e-5
    # the T5 part binds to text_encoder (CogVideoX-Fun's lora_te_ + the T5 path)
    te = load_file(str(next((tmp_path / "out" / "text_encoder").glob("*.safetensors"))))
    key = "encoder.block.0.layer.0.SelfAttention.q"
    name = "lora_te_" + key.replace(".", "_")
    up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
    delta = float(state[f"{name}.alpha"]) / up.shape[1] * up @ down
    assert float((te[f"{key}.weight"] - t5.state_dict()[f"{key}.weight"] - delta).abs().max()) <= 1e-5


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_convert_is_lossless(model, tmp_path, fmt):
    path = tmp_path / "fun.safetensors"
    save_file(fun_lora(model), str(path))
    first = load_adapter(path)
    out = save_adapter(first, tmp_path / ("o" if fmt == "diffusers" else "o.safetensors"), format=fmt)
    if fmt == "kohya":  # CogVideoX-Fun's own names (its LoRANetwork loads them with load_state_dict)
        assert set(load_file(str(out))) == set(load_file(str(path)))
    back = load_adapter(out)
    assert set(back.modules) == set(first.modules)
    assert all(torch.equal(back.modules[k].delta(), m.delta()) for k, m in first.modules.items())
    if fmt != "diffusers":
        assert back.meta["dit"]["family"] == "cogvideox"


def test_comfyui_names_merge_like_kohya(model, pipeline, tmp_path):
    state = fun_lora(model)
    kohya, comfy = tmp_path / "k.safetensors", tmp_path / "c.safetensors"
    save_file(state, str(kohya))
    save_adapter(load_adapter(kohya), comfy, format="comfyui")
    assert all(k.startswith("diffusion_model.transformer_blocks.") or k.startswith("diffusion_model.")
               for k in load_file(str(comfy)))  # fmt: skip
    merge(pipeline, [kohya], tmp_path / "a")
    merge(pipeline, [comfy], tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_attn1_only_names_told_by_the_base_or_refused(model, pipeline, tmp_path):
    """attn1-only ComfyUI names are LTX-Video's too: the CogVideoX base decides; without one, one line."""
    path = tmp_path / "attn.safetensors"
    state = fun_lora(model, prefix="diffusion_model.", attn_only=True)
    save_file({k.replace("_attn1_", ".attn1.").replace("blocks_", "blocks.").replace("_to_", ".to_")
               .replace("to_out_0", "to_out.0"): v for k, v in state.items()}, str(path))  # fmt: skip
    with pytest.raises(UnsupportedError) as err:
        load_adapter(path)
    assert "LTX-Video and CogVideoX share" in str(err.value) and "--base" in (err.value.hint or "")
    merge(pipeline, [path], tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(ours["transformer_blocks.0.attn1.to_q.weight"],
                           model.state_dict()["transformer_blocks.0.attn1.to_q.weight"])  # fmt: skip
    # CogVideoX-Fun's double underscore tells it without a base
    kohya = tmp_path / "attn-fun.safetensors"
    save_file(fun_lora(model, attn_only=True), str(kohya))
    assert load_adapter(kohya).meta["dit"]["family"] == "cogvideox"


def test_merge_into_single_file_in_its_names(model, pipeline, tmp_path):
    """A bare single file of the transformer (the diffusers names; found by transformer_blocks.N.norm2.linear)."""
    path = tmp_path / "fun.safetensors"
    state = fun_lora(model)
    save_file(state, str(path))
    base = tmp_path / "cogvideox-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    merge(base, [path], tmp_path / "merged.safetensors")
    merged, want = load_file(str(tmp_path / "merged.safetensors")), _fun_merge(model, state)
    assert set(merged) == set(want)
    assert max(float((merged[k] - want[k]).abs().max()) for k in merged) <= 1e-5


def test_diffusers_attn1_only_is_not_written_as_kohya_or_comfyui(model, tmp_path):
    """diffusers' train_cogvideox_lora.py trains to_q/to_k/to_v/to_out.0 only: names LTX-Video's diffusers files
    share, while both families' kohya and ComfyUI names differ: refused in one line each, not guessed."""
    state = {k.replace("diffusion_model.", "transformer."): v
             for k, v in fun_lora(model, prefix="diffusion_model.", attn_only=True).items()}  # fmt: skip
    state = {k.replace("_attn1_", ".attn1.").replace("blocks_", "blocks.").replace("_to_", ".to_")
             .replace("to_out_0", "to_out.0").replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v
             for k, v in state.items() if not k.endswith(".alpha")}  # fmt: skip
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    for fmt in ("kohya", "comfyui"):
        with pytest.raises(UnsupportedError, match="names differ between the two"):
            save_adapter(load_adapter(folder), tmp_path / f"{fmt}.safetensors", format=fmt)


#: ComfyUI's own CogVideoX module names (comfy/ldm/cogvideo/model.py), written out here independently
COMFY = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
         "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out",
         "time_embedding.linear_": "time_embedding_linear_"}  # fmt: skip


def _comfy(name: str) -> str:
    name = name.replace("transformer_blocks.", "blocks.")
    for a, b in COMFY.items():
        name = name.replace(a, b)
    return name


def test_comfyui_names_are_comfys_own_and_merge_into_its_checkpoint(model, pipeline, tmp_path):
    """Written as ComfyUI, the names are ComfyUI's model's (its lora loader binds diffusion_model.<state-dict path>);
    merged into a ComfyUI checkpoint (model.diffusion_model.blocks.N.q.weight) equal to the pipeline merge."""
    kohya = tmp_path / "k.safetensors"
    state = fun_lora(model)
    save_file(state, str(kohya))
    comfy = save_adapter(load_adapter(kohya), tmp_path / "c.safetensors", format="comfyui")
    want = {f"diffusion_model.{_comfy(n)}" for n, _ in _linears(model) if n != "patch_embed.proj"}
    assert {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in load_file(str(comfy))} == want
    assert load_adapter(comfy).meta["dit"]["family"] == "cogvideox"  # ComfyUI's names tell it alone
    base = tmp_path / "cogvideox_comfy.safetensors"
    save_file({f"model.diffusion_model.{_comfy(k)}": v.contiguous() for k, v in model.state_dict().items()}, str(base))
    merge(base, [kohya], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    ref = {f"model.diffusion_model.{_comfy(k)}": v for k, v in _fun_merge(model, state).items()}
    assert set(merged) == set(ref)
    assert max(float((merged[k] - ref[k]).abs().max()) for k in merged) <= 1e-5
