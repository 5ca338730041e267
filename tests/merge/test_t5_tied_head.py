"""A T5 with tied embeddings and an ``lm_head`` LoRA (issue 19 item 2.2): the merged model gives the unmerged
PeftModel's logits under transformers 4.57 and 5.x alike.

While tied, T5 scales the decoder output by d_model**-0.5 before the head; untied, it does not (4.57 tests
``tie_word_embeddings``, 5.x ``scale_decoder_outputs``). The merge unties, so the head it writes carries that
factor (loratools/model/tied.py). .ci/run runs this file a second time in a small transformers 4.57 venv.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools.model.tied import untied_head_scale
from loratools.ops.merge import merge

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

D_MODEL = 32
VOCAB = 96


def _base(folder: Path, config_json: str) -> Path:
    """A tiny random tied T5 as the running transformers saves it; ``hub``: its config.json written as
    google-t5/t5-small's is (neither ``tie_word_embeddings`` nor ``scale_decoder_outputs``: the defaults)."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
    )  # fmt: skip
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(str(folder))
    if config_json == "hub":
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config.pop("tie_word_embeddings", None)
        config.pop("scale_decoder_outputs", None)
        path.write_text(json.dumps(config))
    return folder


def _adapter(base: Path, folder: Path, targets: list[str]) -> Path:
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(base)).eval()
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=7, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(str(folder))
    return folder


def _logits(base: Path, adapter: Path | None = None) -> torch.Tensor:
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(base)).eval()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits


@pytest.mark.parametrize("config_json", ["saved", "hub"])
@pytest.mark.parametrize("targets", [["lm_head"], ["lm_head", "q", "wo"]])
def test_merged_t5_head_gives_the_peft_logits(tmp_path, config_json, targets) -> None:  # noqa: ANN001
    base = _base(tmp_path / "base", config_json)
    adapter = _adapter(base, tmp_path / "adapter", targets)
    out = tmp_path / "merged"
    summary = merge(base, [adapter], out, verify=True)
    assert summary.untied == ["lm_head.weight", "shared.weight"] and summary.verify.verified
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["scale_decoder_outputs"] is False
    want, plain = _logits(base, adapter), _logits(base)
    assert float((want - plain).abs().max()) > 0.1  # the adapter changes the logits
    got = _logits(out)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_untied_head_scale_rule() -> None:
    t5 = {"model_type": "t5", "d_model": 512}
    assert untied_head_scale(t5) == 512**-0.5  # tied by the class default, rescaled
    assert untied_head_scale({**t5, "tie_word_embeddings": True, "scale_decoder_outputs": True}) == 512**-0.5
    assert untied_head_scale({**t5, "tie_word_embeddings": False}) == 1  # T5 v1.1 / flan-t5: never rescaled
    assert untied_head_scale({**t5, "scale_decoder_outputs": False}) == 1  # 5.x's flan-t5 config
    assert untied_head_scale({"model_type": "llama", "tie_word_embeddings": True, "hidden_size": 8}) == 1
    assert untied_head_scale({"model_type": "mt5", "d_model": 512}) == 1  # 5.x never rescales mT5
