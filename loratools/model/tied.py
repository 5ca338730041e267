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
