"""Activated LoRA (aLoRA, PEFT's ``alora_invocation_tokens``): an adapter that acts only on the tokens
from its invocation sequence on, so the KV cache before it is the base model's.

Its factors are ordinary LoRA factors; what differs is *where* the update applies. Merging bakes it
into every token (a different model: the base's behaviour before the invocation is gone), so ``merge``
and ``export-onnx --adapter`` refuse an aLoRA adapter unless told ``--allow-alora``. The invocation
tokens live in ``Adapter.meta["alora_invocation_tokens"]``; PEFT (``adapter_config.json``) and GGUF
(``adapter.alora.invocation_tokens``) files hold them, other formats cannot and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, UnsupportedError

if TYPE_CHECKING:
    from loratools.model.adapter import Adapter

#: formats whose files carry the invocation tokens
FORMATS = ("peft", "gguf")
MERGE_HINT = (
    "pass --allow-alora to merge it anyway: the merged model then applies the adapter to every token, "
    "not only from the invocation tokens on"
)


def check_tokens(value: Any, where: str | Path) -> list[int] | None:
    """``alora_invocation_tokens`` as a list of token ids (None when absent); FormatError otherwise."""
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise FormatError(f"{where}: alora_invocation_tokens must be a list of token ids, got {value!r}")
    return list(value)


def invocation_tokens(adapter: Adapter) -> list[int] | None:
    """The aLoRA invocation tokens of ``adapter``, or None for an adapter that acts on every token."""
    tokens = adapter.meta.get("alora_invocation_tokens")
    if tokens is None:
        tokens = (adapter.meta.get("config") or {}).get("alora_invocation_tokens")
    return list(tokens) if tokens else None


def _tokens_on_disk(path: Path) -> list[int] | None:
    """The invocation tokens a PEFT folder or GGUF file declares, read from its config / header only."""
    from loratools.files.json_file import read_json

    folder = path.parent if path.is_file() and (path.parent / "adapter_config.json").is_file() else path
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        cfg = read_json(folder / "adapter_config.json", "adapter_config.json")
        return check_tokens(cfg.get("alora_invocation_tokens") if isinstance(cfg, dict) else None, folder)
    if path.is_file() and path.suffix == ".gguf":
        from loratools.files.gguf_file import open_gguf_file

        field = open_gguf_file(path).get_field("adapter.alora.invocation_tokens")  # the header only, bounded
        return check_tokens(field.contents() if field is not None else None, path)
    return None


def refuse_merge(adapters: Sequence[str | Path | Adapter], allow: bool) -> None:
    """Refuse (UnsupportedError) to merge any aLoRA adapter among ``adapters`` unless ``allow``."""
    if allow:
        return
    from loratools.model.adapter import Adapter
    from loratools.publishing.hub import resolve_path

    for a in adapters:
        if isinstance(a, Adapter):
            tokens, label = invocation_tokens(a), "adapter"
        else:
            label = str(a)
            tokens = _tokens_on_disk(resolve_path(a, "adapter"))
        if tokens:
            raise UnsupportedError(
                f"{label}: is an activated LoRA (aLoRA, invocation tokens {tokens}): it acts only from those "
                "tokens on, and a merge would apply it to every token",
                hint=MERGE_HINT,
            )


def refuse_format(adapter: Adapter, target: str) -> None:
    """Refuse to write an aLoRA adapter in a format that cannot hold its invocation tokens."""
    tokens = invocation_tokens(adapter)
    if tokens and target not in FORMATS:
        raise UnsupportedError(
            f"the adapter is an activated LoRA (aLoRA, invocation tokens {tokens}); a {target} file cannot "
            "hold the invocation tokens, so it would act on every token",
            hint="write it as PEFT or GGUF instead, e.g. loratools convert ADAPTER --to peft -o OUT",
        )


def refuse_mix(adapters: Sequence[Adapter], labels: Sequence[str]) -> None:
    """Refuse to combine aLoRA adapters with others, or with other invocation tokens."""
    tokens = [invocation_tokens(a) for a in adapters]
    if any(tokens) and any(t != tokens[0] for t in tokens):
        listed = ", ".join(f"{lab}: {t or 'none (plain LoRA)'}" for lab, t in zip(labels, tokens, strict=True))
        raise UnsupportedError(
            f"combine needs the same aLoRA invocation tokens on every input ({listed}); the result would act "
            "from one set of tokens only",
            hint="combine aLoRA adapters that share their invocation tokens",
        )
