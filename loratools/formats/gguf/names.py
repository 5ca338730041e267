"""What a GGUF adapter needs to know about its base: architecture, heads, tensor names and shapes.

llama.cpp names a base tensor by its GGUF name (``blk.0.attn_q.weight``), which its HF converter
(``convert_hf_to_gguf.py``) derives from the Hugging Face name through the ``gguf`` package's
``get_tensor_name_map(arch, n_blocks)``. The same table maps adapter modules forward here and, with the
architecture's own Hugging Face naming (``hf_family``), back. A base is a Hugging Face model folder
(``config.json`` gives the architecture and the head counts; read offline) or a GGUF model file (its
metadata gives them, and its tensor table lets every adapter tensor be checked before writing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import FormatError, InputNotFoundError, UnsupportedError, UsageError

if TYPE_CHECKING:
    import torch

    from loratools.formats.registry import KeyResolver


@dataclass(frozen=True)
class ArchSpec:
    """How llama.cpp's HF converter turns one model family into GGUF.

    ``permute_qk``: Q/K rows are permuted per head (``LlamaModel.permute``, K with the KV head count).
    ``conv1d``: leaf names whose Hugging Face weight is stored (in, out) and transposed by the converter.
    ``hf_family``: the module paths the family's transformers classes use (picks the reverse name).
    ``tied_default``: ``tie_word_embeddings`` when config.json does not say; ``output_dropped``: the
    converter never writes ``lm_head`` (the runtime always reuses ``token_embd``); ``fused_gate_up``:
    ``ffn_up`` holds the gate and up projections stacked by rows (HF ``gate_up_proj``, gate first);
    ``fused_qkv``: ``attn_qkv`` holds Q, K and V stacked by rows (HF ``qkv_proj``). Adapters trained on the
    other layout are fused or split to fit (:mod:`.fused_tensors`).
    """

    gguf_arch: str
    hf_family: str
    permute_qk: bool = False
    conv1d: frozenset[str] = frozenset()
    tied_default: bool = False
    output_dropped: bool = False
    fused_gate_up: bool = False
    fused_qkv: bool = False


_LLAMA_FAMILY = r"^(model\.layers\.\d+\.(self_attn|mlp)\.\w+|model\.embed_tokens|model\.norm|lm_head)$"
#: Hugging Face ``architectures[0]`` -> spec; read from convert_hf_to_gguf.py's @ModelBase.register lines
ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", _LLAMA_FAMILY, permute_qk=True),
    "MistralForCausalLM": ArchSpec("llama", _LLAMA_FAMILY, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec("qwen2", _LLAMA_FAMILY),
    "Qwen3ForCausalLM": ArchSpec("qwen3", _LLAMA_FAMILY),
    # Qwen3MoeModel (conversion/qwen.py): names only; q_norm/k_norm kept; experts stacked into ffn_*_exps
    "Qwen3MoeForCausalLM": ArchSpec("qwen3moe", _LLAMA_FAMILY),
    # LlamaModel: Q/K permuted; block_sparse_moe.experts.{e}.w1/w3/w2 stacked into ffn_gate/up/down_exps
    "MixtralForCausalLM": ArchSpec("llama", _LLAMA_FAMILY, permute_qk=True),
    # GptOssModel (conversion/gpt_oss.py): names only; experts.gate_up_proj (E, in, 2I) transposed, its
    # interleaved columns split gate ::2 / up 1::2 into ffn_gate_exps / ffn_up_exps (formats/gguf/experts.py)
    "GptOssForCausalLM": ArchSpec("gpt-oss", _LLAMA_FAMILY),
    # DeepseekV2Model (conversion/deepseek.py): names only; experts stacked, kv_b_proj split into attn_k_b
    # (per head, transposed) / attn_v_b, which no LoRA is mapped onto (formats/gguf/experts.py)
    "DeepseekV2ForCausalLM": ArchSpec("deepseek2", _LLAMA_FAMILY),
    "DeepseekV3ForCausalLM": ArchSpec("deepseek2", _LLAMA_FAMILY),
    # GemmaModel / Gemma2Model.modify_tensors: no Q/K permutation, norms + 1, lm_head skipped
    "GemmaForCausalLM": ArchSpec("gemma", _LLAMA_FAMILY, tied_default=True, output_dropped=True),
    "Gemma2ForCausalLM": ArchSpec("gemma2", _LLAMA_FAMILY, tied_default=True, output_dropped=True),
    # Gemma3Model: norms + 1 only; lm_head written when the checkpoint has one (the runtime's output is optional)
    "Gemma3ForCausalLM": ArchSpec("gemma3", _LLAMA_FAMILY, tied_default=True),
    # Phi3MiniModel: names only; qkv_proj -> attn_qkv and gate_up_proj -> ffn_up stay fused
    "Phi3ForCausalLM": ArchSpec("phi3", _LLAMA_FAMILY, fused_gate_up=True, fused_qkv=True),
    "GPT2LMHeadModel": ArchSpec(
        "gpt2",
        r"^(transformer\.h\.\d+\.(attn|mlp)\.\w+|transformer\.(wte|wpe|ln_f)|lm_head)$",
        conv1d=frozenset({"c_attn", "c_proj", "c_fc"}),
        tied_default=True,
    ),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "gemma": "GemmaForCausalLM",
                "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "phi3": "Phi3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                "mixtral": "MixtralForCausalLM", "gpt_oss": "GptOssForCausalLM",
                "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}  # fmt: skip
#: GGUF architecture -> spec (Mistral converts as llama)
BY_GGUF_ARCH: dict[str, ArchSpec] = {s.gguf_arch: s for s in reversed(list(ARCHITECTURES.values()))}


def known() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def spec_for_gguf_arch(arch: str, where: object) -> ArchSpec:
    spec = BY_GGUF_ARCH.get(arch)
    if spec is None:
        raise UnsupportedError(
            f"{where}: GGUF architecture {arch!r} is not one loratools maps yet (known: "
            f"{', '.join(sorted(BY_GGUF_ARCH))})",
            hint="open an issue with the model's config.json; other architectures need their converter rewrites",
            path=where,
        )
    return spec


@dataclass
class GgufBase:
    """A base model as the GGUF runtime sees it.

    ``tensors`` (GGUF base only): GGUF name -> (shape in PyTorch order, GGML type name). ``hf``: the
    Hugging Face checkpoint's names and tensors (a KeyResolver, when the caller opened one), for names and
    for comparing saved full tensors with the base's.
    """

    source: str
    spec: ArchSpec
    n_layer: int
    n_head: int
    n_head_kv: int
    tied: bool
    tensors: dict[str, tuple[tuple[int, ...], str]] | None = None
    gguf_path: Path | None = None
    hf: KeyResolver | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return self.spec.gguf_arch

    def gguf_name(self, module: str) -> str | None:
        """The GGUF weight name of a Hugging Face module path, or None when the table has none."""
        found = _name_map(self.arch, self.n_layer).get_name(module)
        return f"{found}.weight" if found else None

    def hf_module(self, tensor: str) -> str | None:
        """The Hugging Face module path of a GGUF weight name (the family's own naming; the HF base's if open)."""
        cands = _reverse_map(self.arch, self.n_layer, self.spec.hf_family).get(tensor.removesuffix(".weight"), [])
        fused = {"qkv_proj"} if self.spec.fused_qkv else set()
        fused |= {"gate_up_proj"} if self.spec.fused_gate_up else set()
        if fused:  # Phi-3's attn_qkv / ffn_up are its fused qkv_proj / gate_up_proj, not another family's names
            cands = sorted(cands, key=lambda c: c.rsplit(".", 1)[-1] not in fused)
        if self.hf is not None:
            keys = set(self.hf.keys())
            on_base = [c for c in cands if f"{c}.weight" in keys]
            cands = on_base or cands
        return cands[0] if cands else None


@cache
def _arch_enum(arch: str) -> Any:
    import gguf

    return {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]


@cache
def _name_map(arch: str, n_layer: int) -> Any:
    import gguf

    return gguf.get_tensor_name_map(_arch_enum(arch), n_layer)


@cache
def _reverse_map(arch: str, n_layer: int, family: str) -> dict[str, list[str]]:
    pattern = re.compile(family)
    out: dict[str, list[str]] = {}
    for hf_name, (_, gguf_name) in _name_map(arch, n_layer).mapping.items():
        if pattern.match(hf_name):
            out.setdefault(gguf_name, []).append(hf_name)
    return out


def _spec_from_config(cfg: dict[str, Any], where: object) -> ArchSpec:
    archs = cfg.get("architectures") or []
    name = archs[0] if archs else _MODEL_TYPES.get(str(cfg.get("model_type")))
    spec = ARCHITECTURES.get(str(name)) or ARCHITECTURES.get(_MODEL_TYPES.get(str(cfg.get("model_type")), ""))
    if spec is None:
        raise UnsupportedError(
            f"{where}: architecture {name or cfg.get('model_type')!r} has no GGUF adapter mapping in loratools "
            f"(known: {known()})",
            hint="merge the adapter and convert the merged model with llama.cpp's convert_hf_to_gguf.py",
            path=where,
        )
    return spec


def _int(cfg: dict[str, Any], keys: tuple[str, ...], where: object) -> int:
    for k in keys:
        if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool):
            return int(cfg[k])
    given = next((k for k in keys if cfg.get(k) is not None), None)
    if given is not None:  # there, but "4" or 4.0 or true: say what it is
        raise FormatError(f"{where}: config.json {given} is {cfg[given]!r}, not an integer", path=where)
    raise FormatError(f"{where}: config.json has no {keys[0]}", path=where)


def _from_config(cfg: Any, where: str, hf: KeyResolver | None = None) -> GgufBase:
    if not isinstance(cfg, dict):
        raise FormatError(f"{where}: expected a config.json object", path=where)
    spec = _spec_from_config(cfg, where)
    n_head = _int(cfg, ("num_attention_heads", "n_head"), where)
    return GgufBase(
        source=where.removesuffix("/config.json"),
        spec=spec,
        n_layer=_int(cfg, ("num_hidden_layers", "n_layer"), where),
        n_head=n_head,
        n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
        tied=spec.output_dropped or bool(cfg.get("tie_word_embeddings", spec.tied_default)),
        hf=hf,
    )


def _from_gguf(path: Path) -> GgufBase:
    import gguf

    from loratools.formats.gguf.checks import block_count, check_model_heads, head_counts

    reader = open_gguf(path)
    if reader.string(gguf.Keys.General.TYPE) == "adapter":
        raise UsageError(
            f"{path}: is a GGUF adapter, not a base model",
            hint="--base takes the model the adapter is for (a .gguf model file or a Hugging Face folder)",
        )
    arch = reader.string(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise FormatError(f"{path}: GGUF model without general.architecture", path=path)
    spec = spec_for_gguf_arch(arch, path)
    n_layer = block_count(reader, arch, model=True)
    n_head, n_head_kv = head_counts(reader, arch, model=True) or (0, 0)
    check_model_heads(reader, arch, spec.permute_qk, n_head, n_head_kv)
    tensors = {t.name: (t.shape, t.type_label) for t in reader.tensors}
    return GgufBase(
        source=str(path),
        spec=spec,
        n_layer=int(n_layer or 0),
        n_head=n_head,
        n_head_kv=n_head_kv,
        tied="output.weight" not in tensors,
        tensors=tensors,
        gguf_path=path,
    )


def open_gguf(path: Path) -> Any:
    """The checked, lazy :class:`~loratools.files.gguf_file.GgufFile` of ``path`` (FormatError naming the
    file and the field or tensor on any damage)."""
    from loratools.files.gguf_file import open_gguf_file

    return open_gguf_file(path)


def read_tensor(path: Path, name: str, reader: Any = None) -> torch.Tensor:
    """One tensor of a GGUF file as a torch tensor in PyTorch layout (F32/F16 as stored, others as fp32)."""
    import gguf
    import numpy as np
    import torch

    reader = reader or open_gguf(path)
    t = reader.tensor(name)
    if t is None:
        raise FormatError(f"{path}: no tensor {name}", path=path)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        arr = np.array(t.data)
    else:
        try:
            with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf scales: check_tensors names them
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UnsupportedError(
                f"{path}: tensor {name} is stored as {t.type_label}, which the gguf package cannot dequantize",
                path=path,
            ) from None
    out = torch.from_numpy(np.ascontiguousarray(arr)).reshape(t.shape)
    return out.to(torch.bfloat16) if t.tensor_type == gguf.GGMLQuantizationType.BF16 else out


def equals_gguf_tensor(path: Path, name: str, value: torch.Tensor) -> bool | None:
    """Whether ``value`` is what GGUF tensor ``name`` stores (encoded in its type by the gguf package and
    compared byte for byte), or None when the package cannot encode that type (K- and I-quants)."""
    import gguf
    import numpy as np

    t = open_gguf(path).tensor(name)
    if t is None:
        return None
    x = value.detach().float().cpu().numpy().astype(np.float32)
    if t.shape != x.shape:
        return False
    try:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            enc = x
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            enc = x.astype(np.float16)
        else:
            enc = gguf.quants.quantize(x, t.tensor_type)
    except (NotImplementedError, gguf.QuantError):
        return None
    return bool(np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), enc.reshape(-1).view(np.uint8)))


def is_gguf_file(path: str | Path) -> bool:
    from loratools.files.gguf_file import is_gguf_file as _is_gguf

    return _is_gguf(path)


def load_base(base: str | Path | GgufBase | KeyResolver) -> GgufBase:
    """A :class:`GgufBase` from a GGUF model file, a Hugging Face folder (its config.json only) or an open
    checkpoint (a KeyResolver: its config, names and tensors)."""
    from loratools.files.json_file import read_json

    if isinstance(base, GgufBase):
        return base
    if not isinstance(base, str | Path):
        where = f"{getattr(base, 'root', 'the base')}/config.json"
        if base.config is None:
            raise UsageError(f"{where}: a GGUF adapter needs the base's config.json (pass its folder as --base)")
        return _from_config(base.config, where, hf=base)
    p = Path(base)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such base model file or folder", path=p)
    if is_gguf_file(p):
        return _from_gguf(p)
    if p.is_dir() and (p / "config.json").is_file():
        return _from_config(read_json(p / "config.json", "config"), str(p / "config.json"))
    raise UsageError(
        f"{p}: not a GGUF model file nor a Hugging Face model folder with config.json",
        hint="pass --base model.gguf or --base the Hugging Face folder the adapter was trained on",
    )
