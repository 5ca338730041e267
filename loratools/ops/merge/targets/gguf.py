"""A GGUF model file: touched tensors rewritten in their own type (K/I-quants as F16), one file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratools.ops.merge.targets import MergeTarget


class GgufTarget(MergeTarget):
    label = "a GGUF model"
    accepts = frozenset({"verify"})  # allow_other_base, like every kind: the rule below
    why = "it keeps each tensor's own type in one file on the CPU"

    @classmethod
    def takes(cls, base: Path, options: Any) -> bool:
        from loratools.ops.merge.gguf import is_gguf_base

        return is_gguf_base(base)

    @classmethod
    def merge(cls, base: Any, base_path: Path, adapters: Any, output: Any, options: Any) -> Any:
        from loratools.ops.merge.gguf import merge_gguf

        if not options.allow_other_base:
            _require_base(base_path, adapters)
        return merge_gguf(
            base_path, list(adapters), output, weights=options.weights, verify=options.verify,
            overwrite=options.overwrite, include=options.include, exclude=options.exclude,
            trust_tensors=options.trust_tensors,
        )  # fmt: skip


def _require_base(base_path: Path, adapters: Any) -> None:
    """The wrong-base rule (:mod:`loratools.ops.base_match`) against what a GGUF header states: its layer and
    head counts. Not its architecture name: llama.cpp writes a Mistral as ``llama``, so a name differing is no
    evidence. An adapter that cannot be read here is left to the merge, which says why."""
    from loratools.errors import LoratoolsError
    from loratools.formats.adapter_io import load_adapter
    from loratools.formats.gguf.names import load_base
    from loratools.ops.base_match import ModelFacts, base_mismatch_error, claimed_base, mismatch

    info = load_base(base_path)
    facts = ModelFacts(
        label=str(base_path),
        sizes={"num_hidden_layers": info.n_layer, "num_attention_heads": info.n_head,
               "num_key_value_heads": info.n_head_kv},
    )  # fmt: skip
    for a in adapters:
        try:
            adapter = load_adapter(a) if isinstance(a, str | Path) else a
        except LoratoolsError:
            continue
        claim = claimed_base(adapter)
        if claim is None:
            continue
        claim.model_types.clear()  # compared by sizes only (see above)
        claim.families.clear()
        differences = mismatch(claim, facts)
        if differences:
            label = str(a) if isinstance(a, str | Path) else str(adapter.meta.get("source") or "the adapter")
            raise base_mismatch_error(label, claim, facts, differences)
