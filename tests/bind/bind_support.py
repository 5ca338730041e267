"""Tiny vision-language wrappers (transformers 5 ``…ForConditionalGeneration``) built from configs, their
text-only counterparts, and PEFT adapters trained on either (random non-zero B)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, head_dim=8,
)  # fmt: skip
MROPE = {"type": "mrope", "mrope_section": [1, 1, 2]}
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "gemma3", "llava", "mistral3"]
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def wrapper_config(family: str):  # noqa: ANN201 - a transformers config
    import transformers as tf

    vision_2d = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     image_size=28, patch_size=14)  # fmt: skip
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2)  # fmt: skip
        return tf.Qwen2VLConfig(text_config=dict(TEXT, rope_scaling=MROPE), vision_config=vision, vocab_size=128)
    if family == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2,
                      fullatt_block_indexes=[0])  # fmt: skip
        return tf.Qwen2_5_VLConfig(text_config=dict(TEXT, rope_scaling=MROPE), vision_config=vision, vocab_size=128)
    if family == "gemma3":
        return tf.Gemma3Config(text_config=TEXT, vision_config=vision_2d, mm_tokens_per_image=4)
    if family == "llava":
        return tf.LlavaConfig(
            text_config=dict(TEXT, model_type="llama"), image_token_index=100,
            vision_config=dict(vision_2d, model_type="clip_vision_model", projection_dim=16),
        )  # fmt: skip
    if family == "mistral3":
        return tf.Mistral3Config(
            text_config=dict(TEXT, model_type="mistral"), image_token_index=100,
            vision_config=dict(vision_2d, model_type="pixtral", head_dim=8),
        )  # fmt: skip
    raise KeyError(family)


def text_config(family: str):  # noqa: ANN201
    """The text-only model of the same sizes (what a text-only adapter was trained on)."""
    import transformers as tf

    cfg = wrapper_config(family).text_config
    if family.startswith("qwen2"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "rope_scaling", "rope_parameters")}
        return tf.Qwen2Config(**d)
    return cfg


def build(config, seed: int = 0):  # noqa: ANN001, ANN201
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    return auto.from_config(config).eval()


def save_model(model, path: Path) -> Path:  # noqa: ANN001
    model.save_pretrained(path)
    return path


def random_b(peft_model) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5


def peft_adapter(model, path: Path, targets: list[str] | str = TARGETS) -> Path:  # noqa: ANN001
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    random_b(pm)
    pm.save_pretrained(path)
    return path


def load_peft(model, adapter: Path):  # noqa: ANN001, ANN201
    """PEFT's own load; returns (peft model, missing adapter keys warned about)."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(model, str(adapter)).eval()
    missing = [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    return pm, missing


IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 2, 7]])


def logits(model) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):  # noqa: ANN001, ANN201
    """family -> (wrapper folder, text-only adapter, wrapper adapter, text-only base folder)."""
    made: dict[str, tuple[Path, Path, Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path, Path, Path]:
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            base = save_model(build(wrapper_config(family)), root / "base")
            text_base = save_model(build(text_config(family)), root / "text-base")
            text_adapter = peft_adapter(build(text_config(family)), root / "text-lora")
            wrapper_adapter = peft_adapter(build(wrapper_config(family)), root / "wrapper-lora")
            made[family] = (base, text_adapter, wrapper_adapter, text_base)
        return made[family]

    return get


def peft_key_check(model, adapter: Path) -> tuple[list[str], list[str]]:  # noqa: ANN001
    """PEFT's own load of ``adapter`` onto ``model``: (missing LoRA keys, unexpected keys) as it reports them."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, str(adapter))
        result = pm.load_adapter(str(adapter), adapter_name="check")
    missing = [k for k in result.missing_keys if ".check." in k or k.endswith(".check")]
    return missing, list(result.unexpected_keys)


def run_cli(*args: str, code: int = 0):  # noqa: ANN201
    from click.testing import CliRunner

    from loratools.cli.main import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r
