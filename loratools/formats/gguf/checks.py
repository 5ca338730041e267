"""What a GGUF header must say before loratools builds anything from it: counts that fit the file, head
counts a converter could have written, and LoRA factor tensors the llama.cpp loader can pair.

Every check here reads tensor infos and metadata only (no tensor data) and raises a FormatError naming the
file and the field or tensor. Bounds: ``block_count`` is at most :data:`MAX_BLOCKS` (the largest released
models have under 200 blocks; the ``gguf`` package's name map costs time and memory per block, ~1 ms
each) and, in a model, at most its tensor count (every block holds tensors); every ``blk.N`` index lies
below it. Head counts are at least 1, the KV heads divide the heads, and a model's ``attn_q`` / ``attn_k``
rows split into whole heads.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from loratools.errors import FormatError

if TYPE_CHECKING:
    from loratools.files.gguf_file import GgufFile, GgufTensor

MAX_BLOCKS = 1024
#: the tensor types llama.cpp's LoRA converter writes (convert_lora_to_gguf.py --outtype)
FACTOR_TYPES = ("F32", "F16", "BF16", "Q8_0")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _bad(f: GgufFile, what: str, hint: str | None = None) -> FormatError:
    return FormatError(
        f"{f.path}: {what}", hint=hint or "the file is damaged or was not written by a GGUF converter", path=f.path
    )


def _count(f: GgufFile, key: str, low: int, high: int, why: str) -> int | None:
    value = f.integer(key)
    if value is not None and not low <= value <= high:
        raise _bad(f, f"metadata {key} is {value}; {why}")
    return value


def block_count(f: GgufFile, arch: str, model: bool) -> int | None:
    """``<arch>.block_count``, checked (see the module docstring); None when an adapter leaves it out."""
    key = f"{arch}.block_count"
    high = min(MAX_BLOCKS, len(f.tensors)) if model else MAX_BLOCKS
    why = f"expected 1 to {high}" + (f" (the file holds {len(f.tensors)} tensors)" if model else "")
    n = _count(f, key, 1, high, why)
    if n is None:
        if model:
            raise _bad(f, f"GGUF model without {key}")
        return None
    for t in f.tensors:
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) >= n:
            raise _bad(f, f"tensor {t.name} is in block {m.group(1)}, beyond {key} {n}")
    return n


def head_counts(f: GgufFile, arch: str, model: bool) -> tuple[int, int] | None:
    """``(head_count, head_count_kv)`` checked; None when an adapter leaves them out."""
    key = f"{arch}.attention.head_count"
    n_head = _count(f, key, 1, 1 << 20, "a model has at least one attention head")
    if n_head is None:
        if model:
            raise _bad(f, f"GGUF model without {key}")
        return None
    kv_key = f"{arch}.attention.head_count_kv"
    n_kv = _count(f, kv_key, 1, n_head, f"expected 1 to {key} ({n_head})")
    n_kv = n_head if n_kv is None else n_kv
    if n_head % n_kv:
        raise _bad(f, f"metadata {kv_key} {n_kv} does not divide {key} {n_head}")
    return n_head, n_kv


def check_model_heads(f: GgufFile, arch: str, permuted: bool, n_head: int, n_kv: int) -> None:
    """A model's attention rows split into whole heads (of an even size where the converter permutes)."""
    per = 2 if permuted else 1
    key = f"{arch}.attention.head_count"
    for t in f.tensors:
        if t.name.endswith(".attn_q.weight"):
            heads, field = n_head, key
        elif t.name.endswith(".attn_k.weight"):
            heads, field = n_kv, f"{key}_kv"
        else:
            continue
        if t.shape[0] % (per * heads):
            size = "even-sized " if per == 2 else ""
            raise _bad(
                f,
                f"tensor {t.name} has {t.shape[0]} rows, which do not split into {heads} {size}heads "
                f"(metadata {field})",
            )


def check_pair(f: GgufFile, stem: str, a: GgufTensor, b: GgufTensor, token_embd: bool) -> int:
    """The pair's rank, after checking both factors are 2-D, of a factor type and of one rank."""
    for t in (a, b):
        if t.type_label not in FACTOR_TYPES:
            raise _bad(
                f,
                f"tensor {t.name} is stored as {t.type_label}; GGUF LoRA factors are {', '.join(FACTOR_TYPES)}",
                "convert the adapter again (loratools convert ... --to gguf)",
            )
        if len(t.shape) != 2 or 0 in t.shape:
            raise _bad(f, f"tensor {t.name} has shape {list(t.shape)}; a LoRA factor is a non-empty matrix")
    rank_a = a.shape[1] if token_embd else a.shape[0]
    if rank_a != b.shape[1]:
        raise _bad(
            f,
            f"LoRA pair {stem}: lora_a {list(a.shape)} and lora_b {list(b.shape)} disagree on the rank "
            f"({rank_a} vs {b.shape[1]})",
        )
    return int(b.shape[1])


#: GGUF tensor kind -> (symbol of its input width, symbol of its output width): kinds sharing a symbol
#: must agree (the llama-family layout; GPT-2's fused attn_qkv has its own output symbol)
_WIDTHS = {
    "attn_q": ("embd", "q"),
    "attn_k": ("embd", "k"),
    "attn_v": ("embd", "v"),
    "attn_output": ("q", "embd"),
    "attn_qkv": ("embd", "qkv"),
    "ffn_gate": ("embd", "ff"),
    "ffn_up": ("embd", "ff"),
    "ffn_down": ("ff", "embd"),
    "output": ("embd", "vocab"),
    "token_embd": ("vocab", "embd"),
}
_KIND = re.compile(r"^(?:blk\.\d+\.)?(\w+)\.weight$")


def check_widths(
    f: GgufFile, pairs: dict[str, tuple[GgufTensor, GgufTensor]], fused_qkv: bool, fused_up: bool = False
) -> None:
    """Factors of tensors that read the same activations have the same input width (and so on): a factor
    with the wrong in-features is refused without the base. ``pairs``: stem -> (lora_a, lora_b);
    ``fused_up``: ``ffn_up`` holds gate and up stacked (Phi-3), so its output is twice ``ffn_down``'s input."""
    seen: dict[str, tuple[int, str]] = {}
    for stem, (a, b) in sorted(pairs.items()):
        m = _KIND.match(stem)
        kind = m.group(1) if m else ""
        if kind not in _WIDTHS:
            continue
        sym_in, sym_out = _WIDTHS[kind]
        if fused_qkv and kind == "attn_output":
            sym_in = "embd"  # GPT-2: c_proj reads the embedding width
        if fused_up and kind == "ffn_up":
            sym_out = "ff2"
        if kind == "token_embd":
            widths = ((sym_in, a.shape[0], a.name), (sym_out, b.shape[0], b.name))
        else:
            widths = ((sym_in, a.shape[1], a.name), (sym_out, b.shape[0], b.name))
        for side, (sym, width, name) in zip(("input", "output"), widths, strict=True):
            first = seen.setdefault(sym, (width, name))
            if first[0] != width:
                raise _bad(
                    f,
                    f"tensor {name} gives an {side} width of {width} where {first[1]} gives {first[0]} "
                    "(the same width in the model)",
                )


def lora_pairs(f: GgufFile) -> tuple[dict[str, tuple[GgufTensor, GgufTensor]], list[str]]:
    """``(stem -> (lora_a, lora_b), ignored norm tensors)``; a FormatError for any other tensor or a
    pair missing a half (the llama.cpp loader refuses both)."""
    halves: dict[str, dict[str, GgufTensor]] = {}
    ignored: list[str] = []
    for t in f.tensors:
        stem, _, suffix = t.name.rpartition(".")
        if suffix in ("lora_a", "lora_b"):
            halves.setdefault(stem, {})[suffix] = t
        elif t.name.endswith("_norm.weight"):
            ignored.append(t.name)  # the runtime skips these (llama_adapter_lora_init_impl)
        else:
            raise _bad(f, f"tensor {t.name} has an unexpected suffix (llama.cpp refuses it)")
    pairs = {}
    for stem, p in halves.items():
        if set(p) != {"lora_a", "lora_b"}:
            missing = "lora_b" if "lora_a" in p else "lora_a"
            raise _bad(f, f"LoRA pair {stem} has no {stem}.{missing}")
        pairs[stem] = (p["lora_a"], p["lora_b"])
    return pairs, ignored
