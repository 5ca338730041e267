"""kohya / sd-scripts files: diffusers' own loader is the oracle for the reader's deltas."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from formats_support import component_weights, fused_weights
from safetensors.torch import load_file, save_file

from loratools.errors import UnsupportedError
from loratools.formats.adapter_io import load_adapter, save_adapter


def test_reader_deltas_match_diffusers_fuse(pipe, sd_dir, kohya_uniform):
    """load_lora_weights + fuse_lora changes exactly the weights our reader predicts, by exactly ΔW."""
    adapter = load_adapter(kohya_uniform, base=sd_dir)
    assert adapter.meta["unresolved"] == []
    before = component_weights(pipe)
    after = fused_weights(pipe, kohya_uniform)
    changed = {k[: -len(".weight")] for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(adapter.modules)
    kinds = {m.kind for m in adapter.modules.values()}
    assert kinds == {"linear", "conv"}
    assert any(m.down.shape[-1] == 3 for m in adapter.modules.values())  # a 3×3 conv
    for name, m in adapter.modules.items():
        assert m.alpha != m.rank
        delta = m.delta()
        observed = after[f"{name}.weight"] - before[f"{name}.weight"]
        assert delta.abs().max() > 0.05  # far above the tolerance
        torch.testing.assert_close(observed, delta, atol=2e-6, rtol=1e-5, msg=name)


def test_mixed_alphas_are_per_module(sd_dir, kohya_mixed):
    """Every module's scale is its own alpha / its own rank, read straight from the file."""
    raw = load_file(str(kohya_mixed))
    adapter = load_adapter(kohya_mixed, base=sd_dir)
    assert len(adapter.alphas()) == 3 and len(adapter.ranks()) == 2
    names = adapter.meta["kohya_names"]
    for name, m in adapter.modules.items():
        k = names[name]
        up, down = raw[f"{k}.lora_up.weight"], raw[f"{k}.lora_down.weight"]
        expected = float(raw[f"{k}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        torch.testing.assert_close(m.delta().reshape(expected.shape), expected)


def test_names_resolve_with_and_without_text_model_prefix(sd_dir, sd_dir_text_model, kohya_mixed):
    plain = load_adapter(kohya_mixed, base=sd_dir)
    hub = load_adapter(kohya_mixed, base=sd_dir_text_model)
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" in plain.modules
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in hub.modules
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in plain.modules
    assert plain.meta["unresolved"] == [] and hub.meta["unresolved"] == []


def test_component_base_resolves_its_own_prefix(sd_dir, kohya_mixed):
    te_only = load_adapter(kohya_mixed, base=sd_dir / "text_encoder")
    resolved = [n for n in te_only.modules if "." in n]
    assert sorted(resolved) == sorted(
        [
            "encoder.layers.0.self_attn.q_proj",
            "encoder.layers.0.self_attn.out_proj",
            "encoder.layers.1.mlp.fc1",
            "encoder.layers.1.mlp.fc2",
        ]
    )
    assert all(n.startswith("lora_unet_") for n in te_only.meta["unresolved"])


def test_without_base_names_stay_kohya(kohya_mixed):
    adapter = load_adapter(kohya_mixed)
    assert adapter.format == "kohya"
    assert all(n.startswith(("lora_unet_", "lora_te_")) and "." not in n for n in adapter.modules)
    assert adapter.meta["metadata"]["ss_output_name"] == "tiny"


def test_missing_zero_and_nan_alpha_mean_rank(work):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, alpha in (("lora_unet_a_b", None), ("lora_unet_c_d", 0.0)):
        sd[f"{name}.lora_down.weight"] = torch.randn(3, 8, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(6, 3, generator=g)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    path = work / "noalpha.safetensors"
    save_file(sd, str(path))
    adapter = load_adapter(path)
    assert {m.alpha for m in adapter.modules.values()} == {3.0}
    assert {m.scale for m in adapter.modules.values()} == {1.0}


def test_kohya_rewrite_keeps_metadata_and_recomputes_hashes(kohya_mixed, work):
    adapter = load_adapter(kohya_mixed)
    same = save_adapter(adapter, work / "same.safetensors", format="kohya")
    raw_in, raw_out = load_file(str(kohya_mixed)), load_file(str(same))
    assert raw_in.keys() == raw_out.keys()
    assert all(torch.equal(raw_in[k], raw_out[k]) for k in raw_in)
    from loratools.files.safetensors_file import read_header

    _, meta = read_header(same)
    for k in ("ss_output_name", "modelspec.architecture", "modelspec.title", "ss_base_model_version"):
        assert meta[k] == json.loads(json.dumps(meta[k]))
    # sd-scripts' model hash is the sha256 of the data section, which metadata does not change
    data = same.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert meta["ss_network_dim"] == "4"  # unchanged content keeps the declared values

    smaller = adapter.select(exclude="lora_te_")
    for m in smaller.modules.values():
        m.up = m.up * 2
    changed = save_adapter(smaller, work / "changed.safetensors", format="kohya")
    _, meta2 = read_header(changed)
    assert meta2["ss_network_dim"] == "Dynamic" and meta2["ss_network_alpha"] == "Dynamic"
    assert meta2["sshs_model_hash"] != meta["sshs_model_hash"]
    assert meta2["ss_output_name"] == "tiny"


def test_dora_scale_reads_as_magnitude(work):
    g = torch.Generator().manual_seed(1)
    sd = {
        "lora_unet_x.lora_down.weight": torch.randn(2, 8, generator=g),
        "lora_unet_x.lora_up.weight": torch.randn(5, 2, generator=g),
        "lora_unet_x.alpha": torch.tensor(1.0),
        "lora_unet_x.dora_scale": torch.rand(5, 1, generator=g) + 0.5,
    }
    path = work / "dora.safetensors"
    save_file(sd, str(path))
    m = load_adapter(path).modules["lora_unet_x"]
    assert m.magnitude is not None and m.magnitude.shape == (5,)
    out = save_adapter(load_adapter(path), work / "dora2.safetensors", format="kohya")
    assert torch.equal(load_file(str(out))["lora_unet_x.dora_scale"], sd["lora_unet_x.dora_scale"])


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("lora_unet_down_blocks_0_x.lora_mid.weight", "LoCon \\(Tucker\\)"),
        ("lora_unet_down_blocks_0_x.w_norm", "norm"),
        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", "Flux/SD3"),
    ],
)
def test_refused_layouts(work, key, what):
    path = work / f"refused-{what.replace('/', '')}-{len(key)}.safetensors"
    save_file({key: torch.ones(2, 4)}, str(path))
    with pytest.raises(UnsupportedError, match=what):
        load_adapter(path)


#: diffusers UNet path -> the original-UNet (SGM) path sd-scripts' SDXL trainer names it by, worked out by hand
#: for the tiny UNet (layers_per_block 1: CrossAttnDown, Down / Up, CrossAttnUp)
SGM_NAMES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.3.0.emb_layers.1",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
    "up_blocks.0.resnets.1.conv2": "output_blocks.1.0.out_layers.3",
    "up_blocks.1.resnets.0.conv_shortcut": "output_blocks.2.0.skip_connection",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
}


def test_sdxl_style_sgm_names_resolve(pipe, sd_dir, work):
    """kohya files trained on sd-scripts' original UNet resolve against a diffusers UNet; diffusers agrees."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for path, sgm in SGM_NAMES.items():
        layer = pipe.unet.get_submodule(path)
        key = "lora_unet_" + sgm.replace(".", "_")
        if isinstance(layer, torch.nn.Conv2d):
            sd[f"{key}.lora_down.weight"] = torch.randn(4, layer.in_channels, *layer.kernel_size, generator=g) * 0.3
            sd[f"{key}.lora_up.weight"] = torch.randn(layer.out_channels, 4, 1, 1, generator=g) * 0.3
        else:
            sd[f"{key}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.3
            sd[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    path = work / "sgm.safetensors"
    save_file(sd, str(path))
    adapter = load_adapter(path, base=sd_dir)
    assert adapter.meta["unresolved"] == []
    assert set(adapter.modules) == {f"unet.{p}" for p in SGM_NAMES}
    # the SDXL pipeline passes its UNet config so diffusers maps the block numbers; the SD one must be told
    before, after = component_weights(pipe), fused_weights(pipe, path, unet_config=pipe.unet.config)
    for name, m in adapter.modules.items():
        torch.testing.assert_close(after[f"{name}.weight"] - before[f"{name}.weight"], m.delta(), atol=2e-6, rtol=1e-5)
