"""The task an exported graph serves, named from the model class (what Optimum calls the export task)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: task label -> transformers' table of the model classes for it (the class decides, not the config type:
#: a BertConfig appears in the causal-LM table too, through BertLMHeadModel)
_TASK_TABLES = (
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("sequence-classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("token-classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("multiple-choice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
)


def task_of(model: torch.nn.Module, output: str) -> str:
    """The task the exported graph serves, from the model's class: ``causal-lm``, ``sequence-classification``,
    ``token-classification``, ``masked-lm``, ``multiple-choice``; ``encoder`` for a ``last_hidden_state``
    graph; ``logits`` for a class no table names."""
    from transformers.models.auto import modeling_auto

    if output == "last_hidden_state":
        return "encoder"
    name = type(model).__name__
    for task, table in _TASK_TABLES:
        for value in getattr(modeling_auto, table, {}).values():
            if name in ((value,) if isinstance(value, str) else tuple(value)):
                return task
    return "logits"
