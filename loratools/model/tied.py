"""Tied embeddings and saved base layers: the one place that says which names are the same tensor.

A model whose config ties word embeddings (Qwen2, small Llamas, GPT-2) stores only the input embedding;
its output head (``lm_head.weight``) reads that tensor. An adapter that targets ``lm_head`` is still
for this base: merge, validate and info all resolve the head to the embedding through these functions.
PEFT also saves the base layer of an adapted embedding or tied head (``lm_head.base_layer.weight``): a
copy of the base weight, not a trained tensor, so it is neither a counterpart the base must have nor a
trainable parameter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter

#: last path component of output heads and suffixes of input embeddings (for tied weights)
HEAD_NAMES = ("lm_head", "embed_out")
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "shared.weight")


#: model types whose config class ties word embeddings by default (transformers 5.25's config classes; a
#: config.json may leave the key out when it equals that default, and then the loader ties them)
TIED_BY_DEFAULT = frozenset({
    "albert", "bart", "bert", "bert-generation", "blenderbot", "blenderbot-small", "bloom", "cohere", "cohere2",
    "cohere2_moe", "deberta", "deberta-v2", "distilbert", "electra", "ernie", "ernie4_5", "ernie4_5_moe", "falcon",
    "falcon_mamba", "gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text",
    "gpt2", "gpt_bigcode", "led", "longt5", "m2m_100", "mamba", "marian", "mbart", "minicpm3", "mistral3",
    "moonshine", "mt5", "nllb-moe", "opt", "pegasus", "pegasus_x", "roberta", "roberta-prelayernorm", "smollm3",
    "starcoder2", "switch_transformers", "t5", "t5gemma", "umt5", "whisper", "xlm", "xlm-roberta",
    "xlm-roberta-xl",
})


def config_ties(cfg: dict[str, Any] | None) -> bool:
    """``tie_word_embeddings`` as transformers will read it from ``cfg`` (config.json): the key where it is
    written (top level, else ``text_config``), else the architecture's class default — not False."""
    cfg = cfg or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for c in (cfg, text):
        if "tie_word_embeddings" in c:
            return bool(c["tie_word_embeddings"])
    model_type = cfg.get("model_type") or text.get("model_type")
    return isinstance(model_type, str) and model_type in TIED_BY_DEFAULT


#: model types that scale the decoder's output by d_model**-0.5 before a *tied* head and not before an untied
#: one: transformers 4.57 tests ``config.tie_word_embeddings`` there (T5, UMT5, LongT5, Pop2Piano,
#: SwitchTransformers, UDOP); 5.x forces T5/UMT5/LongT5/Pop2Piano configs to tie and tests
#: ``config.scale_decoder_outputs`` instead, set from the ``tie_word_embeddings`` config.json gives unless the file
#: says ``scale_decoder_outputs`` itself. (mT5 is left out: 5.x never rescales it, 4.57 does while tied.)
SCALED_WHEN_TIED = frozenset({"t5", "umt5", "longt5", "pop2piano", "switch_transformers", "udop"})


def untied_head_scale(cfg: dict[str, Any] | None) -> float:
    """The factor an output head untied from the embedding must carry in its weight so that the merged model
    computes what the tied one did: d_model**-0.5 for the :data:`SCALED_WHEN_TIED` models (untied, both
    transformers majors drop that rescale of the decoder output; the merged config says so), else 1."""
    cfg = cfg or {}
    d_model, scaled = cfg.get("d_model"), cfg.get("scale_decoder_outputs") is not False
    if cfg.get("model_type") not in SCALED_WHEN_TIED or not config_ties(cfg) or not scaled:
        return 1.0
    return float(d_model) ** -0.5 if isinstance(d_model, int) and d_model > 0 else 1.0


def untie_config(cfg: dict[str, Any], head_scaled: bool) -> None:
    """Mark ``cfg`` (one level of config.json) untied; a head that carries its rescale turns the model's off."""
    cfg["tie_word_embeddings"] = False
    if head_scaled:
        cfg["scale_decoder_outputs"] = False  # read by transformers 5.x; 4.57 stops rescaling once untied


def tied_embedding_key(reader: Any) -> str | None:
    """The input-embedding key of a base whose config ties word embeddings, else None.

    ``reader`` is a checkpoint reader (anything with ``keys()`` and ``tie_word_embeddings``).
    """
    if not getattr(reader, "tie_word_embeddings", False):
        return None
    found = [k for k in reader.keys() if k.endswith(EMBED_SUFFIXES)]
    return found[0] if len(found) == 1 else None


def is_head(key: str) -> bool:
    """True for an output head's weight key (``lm_head.weight``, ``embed_out.weight``)."""
    module, _, suffix = key.rpartition(".")
    return suffix == "weight" and module.rsplit(".", 1)[-1] in HEAD_NAMES


def tied_source(reader: Any, module: str) -> str | None:
    """The base tensor an output head ``module`` reads when the base ties it to the input embedding
    and stores no weight of its own; None otherwise."""
    emb = tied_embedding_key(reader)
    if emb is None or module.rsplit(".", 1)[-1] not in HEAD_NAMES or f"{module}.weight" in reader.keys():
        return None
    return emb


def base_layer_copies(adapter: Adapter) -> list[str]:
    """Full tensors that are saved base layers of LoRA modules (PEFT's ``….base_layer.weight``), not
    trained replacements: the module is also a LoRA module of the adapter."""
    return sorted(k for k in adapter.replacements if k.rpartition(".")[0] in adapter.modules)
