"""kohya text-encoder parts of the one-encoder diffusion transformers (issue 21, item 3): ``lora_te_`` + the
encoder's own module path binds to the pipeline's ``text_encoder`` — sd-scripts ``networks/lora_lumina.py``
(``LORA_PREFIX_TEXT_ENCODER = "lora_te"`` over Gemma2Attention/Gemma2MLP), CogVideoX-Fun's T5 (tests/dit/
test_cogvideox.py) and Z-Image's Qwen3 the same way — merged as W += alpha/rank · up·down (sd-scripts' rule);
written back under the same names. HiDream's four encoders are refused in one line (hostile_cogvideox)."""

from __future__ import annotations

import json

import pytest
import torch
from nextdit_support import LUMINA2, Z_IMAGE
from safetensors.torch import load_file, save_file

from loratools import load_adapter, merge, save_adapter


def _gemma2():
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(vocab_size=32, hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=6)  # fmt: skip
    return Gemma2Model(cfg).eval(), "Gemma2Model"


def _qwen3():
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(vocab_size=32, hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=6)  # fmt: skip
    return Qwen3Model(cfg).eval(), "Qwen3Model"


@pytest.mark.parametrize(("family", "encoder"), [(LUMINA2, _gemma2), (Z_IMAGE, _qwen3)], ids=["lumina2", "z_image"])
def test_lora_te_binds_to_text_encoder(family, encoder, tmp_path):
    model = family.model()
    torch.manual_seed(4)
    te, cls = encoder()
    folder = family.save_pipeline(model, tmp_path / "pipe")
    te.save_pretrained(folder / "text_encoder")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", cls]}))
    state = family.lora(model, "kohya")
    g = torch.Generator().manual_seed(5)
    te_mods = [(n, m) for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (name, lin) in enumerate(te_mods):  # sd-scripts: lora_te + "." + module path, dots -> "_"
        stem = "lora_te_" + name.replace(".", "_")
        state[f"{stem}.lora_down.weight"] = torch.randn(2, lin.in_features, generator=g)
        state[f"{stem}.lora_up.weight"] = torch.randn(lin.out_features, 2, generator=g)
        state[f"{stem}.alpha"] = torch.tensor(1.0 + i)
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    merge(folder, [path], tmp_path / "out")
    ours = load_file(str(next((tmp_path / "out" / "text_encoder").glob("*.safetensors"))))
    base = te.state_dict()
    worst = 0.0
    for i, (name, _) in enumerate(te_mods):
        stem = "lora_te_" + name.replace(".", "_")
        up, down = state[f"{stem}.lora_up.weight"], state[f"{stem}.lora_down.weight"]
        want = base[f"{name}.weight"] + (1.0 + i) / 2 * up @ down
        assert float((want - base[f"{name}.weight"]).abs().max()) > 1e-2  # it moves
        worst = max(worst, float((ours[f"{name}.weight"] - want).abs().max()))
    assert worst <= 1e-5
    # read against the pipeline, the modules are the component's; written back as kohya they are lora_te_ again
    adapter = load_adapter(path, base=folder)
    assert {n for n in adapter.modules if n.startswith("text_encoder.")} == {f"text_encoder.{n}" for n, _ in te_mods}
    back = load_file(str(save_adapter(adapter, tmp_path / "k.safetensors", format="kohya")))
    assert {k for k in back if k.startswith("lora_te")} == {k for k in state if k.startswith("lora_te")}
