"""PEFT trainable tokens (``trainable_token_indices``): new rows for chosen tokens of an embedding.

PEFT saves ``<embedding>.token_adapter.trainable_tokens_delta`` (n × dim): despite the name these are
the rows' new *values*, and ``TrainableTokensLayer.merge`` writes them with
``weight.index_copy(0, indices, values)`` (peft 0.21, tuners/trainable_tokens/layer.py). On a base
whose output head is tied to the embedding, PEFT wraps the head with the same layer, so the head's rows
change too. Given the base weight W the update is an exact rank-n LoRA on the embedding:
ΔW = Pᵀ·(V − W[idx]) with P the n one-hot rows of the indices; :func:`lower_tokens` builds it (and the
same for a tied head), so merge, verify and every other part of the house need no new update kind.
Without a base the rows stay in ``adapter.meta["trainable_tokens"]``; writers refuse such an adapter.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, UnsupportedError, ValidationError

if TYPE_CHECKING:
    import torch

    from loratools.model.adapter import Adapter

#: the PEFT tensor key suffix of a trainable-tokens layer's values
SUFFIX = ".token_adapter.trainable_tokens_delta"


def token_rows(values: dict[str, torch.Tensor], indices: Any, where: Any) -> dict[str, dict[str, Any]]:
    """``{module: {"indices": [...], "values": n×dim tensor}}`` from the saved values and the config's
    ``trainable_token_indices`` (a list for the input embedding, or ``{module name: list}``)."""
    rows = {}
    for module, tensor in values.items():
        if isinstance(indices, dict):
            found = [v for k, v in indices.items() if module == k or module.endswith("." + k)]
            chosen = found[0] if len(found) == 1 else None
        else:
            chosen = indices
        if not isinstance(chosen, list) or not all(isinstance(i, int) and i >= 0 for i in chosen):
            raise FormatError(f"{where}: trainable_token_indices names no token list for {module}", path=where)
        if tensor.ndim != 2 or tensor.shape[0] != len(chosen):
            raise FormatError(
                f"{where}: {module}{SUFFIX} has shape {list(tensor.shape)} for {len(chosen)} token indices",
                path=where,
            )
        rows[module] = {"indices": list(chosen), "values": tensor}
    return rows


def lower_tokens(adapter: Adapter, reader: Any) -> Adapter:
    """``adapter`` with its trainable tokens as exact LoRA modules against the base ``reader``."""
    import torch

    from loratools.checkpoint.keymap import KeyMatcher
    from loratools.model.adapter import LoraModule
    from loratools.model.tied import HEAD_NAMES, tied_embedding_key

    rows = adapter.meta.get("trainable_tokens")
    if not rows:
        return adapter
    matcher = KeyMatcher(reader.keys())
    modules = dict(adapter.modules)
    for module, spec in rows.items():
        key = matcher.tensor_key(module)
        if key is None:
            raise ValidationError(
                f"trainable tokens of {module}: no weight {module}.weight in the base {reader.root}",
                hint="is this the base model the adapter was trained on?",
            )
        name = key.rpartition(".")[0]
        weight = reader.get(key).to(torch.float32)
        index = torch.tensor(spec["indices"], dtype=torch.long)
        if int(index.max()) >= weight.shape[0] or spec["values"].shape[1] != weight.shape[1]:
            raise ValidationError(
                f"trainable tokens of {module}: indices up to {int(index.max())} and rows of "
                f"{spec['values'].shape[1]} do not fit {key} {list(weight.shape)} in {reader.root}"
            )
        heads = [HEAD_NAMES[0]] if key == tied_embedding_key(reader) else []  # PEFT changes a tied head too
        for target in (name, *heads):
            if target in modules:
                raise UnsupportedError(
                    f"{target}: both a LoRA and trainable tokens; loratools merges one update per module",
                    hint="merge the two parts as two adapters, or train the module one way",
                )
        n = len(spec["indices"])
        pick = torch.zeros(n, weight.shape[0])
        pick[torch.arange(n), index] = 1.0
        change = spec["values"].to(torch.float32) - weight[index]  # n × dim: new rows minus old rows
        modules[name] = LoraModule(down=pick, up=change.T.contiguous(), alpha=float(n), kind="embedding")
        for head in heads:
            modules[head] = LoraModule(down=change, up=pick.T.contiguous(), alpha=float(n), kind="linear")
    meta = {k: v for k, v in adapter.meta.items() if k != "trainable_tokens"}
    return replace(adapter, modules=modules, meta=meta)


def refuse_write(adapter: Adapter, target: str) -> None:
    """Writers do not carry trainable tokens yet: refused rather than dropped."""
    rows = adapter.meta.get("trainable_tokens")
    if rows:
        raise UnsupportedError(
            f"the adapter trains tokens of {', '.join(sorted(rows))} (trainable_token_indices); loratools "
            f"merges them but does not write them to a {target} adapter",
            hint="merge it into its base: loratools merge BASE ADAPTER -o OUT",
        )
