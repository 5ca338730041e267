"""A diffusion checkpoint in GGUF as ComfyUI-GGUF writes it, read as a merge base: names, shapes, values.

ComfyUI-GGUF (city96/ComfyUI-GGUF) converts a diffusion model's single file with ``tools/convert.py``: the
original tensor names (``double_blocks.0.img_attn.qkv.weight``, ``blocks.0.self_attn.q.weight``; a
``model.diffusion_model.`` prefix stripped), ``general.architecture`` = ``flux``, ``sd3``, ``wan``, ``hyvid``,
``ltxv`` ... (``ModelTemplate.arch``), BF16 or F16 tensors with 1-D and small (≤ 1024 values) ones in F32; its
patched ``llama-quantize`` (``tools/lcpp.patch``) then quantizes the large ones (Q8_0, Q4_K, ...) and leaves
each family's input/output layers unquantized. SD1/SDXL tensors whose rows are no whole number of 256-value
blocks are stored reshaped to (n/256, 256), their real shape in ``comfy.gguf.orig_shape.<name>`` (an INT32
array; ``loader.py``'s ``get_orig_shape``). Wan and HunyuanVideo's 5-D patch-embedding weight is added back as
F32 by ``tools/fix_5d_tensors.py``, so these files may hold a 5-D tensor (llama.cpp reads at most 4).

:class:`GgufDitBase` answers what the merge plan asks of a base (the ``KeyResolver`` protocol plus what
``build_plan`` reads): every name, its logical shape (``orig_shape`` when recorded, as ComfyUI's loader reads it)
and its values dequantized to fp32 on demand. The header is read by the bounded reader
(:mod:`loratools.files.gguf_file`). :func:`open_checkpoint` opens such a file as a base for every command
(``validate --base``, ``info --base``, ``convert --base``, ``merge``); a GGUF file without ``general.architecture``
(stable-diffusion.cpp writes none) is read here too, and the callers (``formats.adapter_io.gguf_base_kind``) take
it as a diffusion base only when its names are a diffusion transformer's original ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.checkpoint.reader import CheckpointReader
from loratools.errors import FormatError

if TYPE_CHECKING:
    import torch

    from loratools.files.gguf_file import GgufFile, GgufTensor

#: ``general.architecture`` values ComfyUI-GGUF's ``loader.py`` loads as image models (``IMG_ARCH_LIST``)
DIFFUSION_ARCHS = frozenset(
    {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2", "qwen_image"}
)
#: the most dimensions a tensor may have here (the 5-D conv weights ``fix_5d_tensors.py`` adds)
MAX_DIMS = 5
ORIG_SHAPE = "comfy.gguf.orig_shape."
#: stored types read as a plain float dtype (the merge updates those in place, like a safetensors tensor)
FLOAT_TYPES = ("F32", "F16", "BF16")


def peek_architecture(path: str | Path) -> str | None:
    """``general.architecture`` when it is the file's first key/value (every ``GGUFWriter`` and llama-quantize
    puts it there), read without parsing the rest of the header (an LLM's tokenizer arrays); else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24 + 8 + 64 + 4 + 8 + 64)
    except OSError:
        return None
    if len(head) < 36 or head[:4] != b"GGUF" or struct.unpack_from("<I", head, 4)[0] not in (2, 3):
        return None
    if struct.unpack_from("<Q", head, 16)[0] < 1:
        return None
    n = struct.unpack_from("<Q", head, 24)[0]
    if n != len("general.architecture") or head[32 : 32 + n] != b"general.architecture":
        return None
    off = 32 + n
    if len(head) < off + 12 or struct.unpack_from("<I", head, off)[0] != 8:  # a STRING value
        return None
    size = struct.unpack_from("<Q", head, off + 4)[0]
    value = head[off + 12 : off + 12 + size]
    if size > 64 or len(value) != size:
        return None
    return value.decode("utf-8", "replace")


def is_diffusion_gguf(path: str | Path) -> bool:
    """A GGUF file whose architecture is one of ComfyUI-GGUF's image models (a header that cannot be read is left
    to the llama.cpp target, whose reader names the damage)."""
    from loratools.errors import LoratoolsError
    from loratools.files.gguf_file import MAGIC, open_gguf_file

    p = Path(path)
    if not p.is_file():
        return False
    arch = peek_architecture(p)
    if arch is None:  # not the first key/value (another writer): the whole header, bounded
        with open(p, "rb") as fh:
            if fh.read(4) != MAGIC:
                return False
        try:
            arch = open_gguf_file(p, MAX_DIMS).string("general.architecture")
        except LoratoolsError:
            return False
    return arch in DIFFUSION_ARCHS


def gguf_architecture(path: str | Path) -> str | None:
    """``general.architecture`` of a GGUF file (the bounded header read where it is not the first key), None when
    the file states none; a FormatError naming the damage when the header cannot be read."""
    arch = peek_architecture(path)
    if arch is not None:
        return arch
    from loratools.files.gguf_file import open_gguf_file

    return open_gguf_file(Path(path), MAX_DIMS).string("general.architecture")


def open_gguf_checkpoint(path: Path) -> GgufDitBase:
    """A GGUF file as a base checkpoint (:func:`loratools.checkpoint.reader.open_checkpoint`): a diffusion model
    (ComfyUI-GGUF's architectures, or none stated) as :class:`GgufDitBase`; a llama.cpp model is refused."""
    arch = gguf_architecture(path)
    if arch is not None and arch not in DIFFUSION_ARCHS:
        raise FormatError(
            f"{path}: a llama.cpp GGUF model (architecture {arch!r}), not a checkpoint whose tensors are read here",
            hint="it is the base for GGUF adapters and GGUF merges: `loratools convert ADAPTER --to gguf --base "
            "MODEL.gguf`, `loratools merge MODEL.gguf ADAPTER -o merged.gguf`",
            path=path,
        )
    return GgufDitBase(path)


@dataclass(frozen=True)
class DitTensorInfo:
    """One tensor as the plan sees it: ``shape`` the logical one, ``dtype`` a safetensors dtype name (the stored
    float type, ``F32`` for a quantized one: what the merge computes it in)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    tensor: GgufTensor

    @property
    def stored_type(self) -> str:
        return self.tensor.type_label

    @property
    def nbytes(self) -> int:
        return int(self.tensor.n_bytes)

    @property
    def is_float(self) -> bool:
        return True


class GgufDitBase(CheckpointReader):
    """The base-checkpoint face of a ComfyUI-GGUF diffusion file (see the module docstring): a
    ``CheckpointReader`` to the adapter readers, every method its own (no safetensors file is opened)."""

    kind = "file"
    quant: Any = None
    quantization: str | None = None  # type: ignore[assignment]  (a property of the safetensors reader)
    tie_word_embeddings = False  # type: ignore[assignment]

    def __init__(self, path: str | Path) -> None:  # noqa: B027 - CheckpointReader's __init__ opens safetensors
        from loratools.files.gguf_file import open_gguf_file

        self.root = Path(path)
        self.file: GgufFile = open_gguf_file(self.root, MAX_DIMS)
        self.files = [self.root]
        self.config: dict[str, Any] | None = None
        self.components: dict[str, Any] = {}
        self.arch = self.file.string("general.architecture") or ""
        self.infos: dict[str, DitTensorInfo] = {}
        for t in self.file.tensors:
            shape = self._orig_shape(t) or t.shape
            dtype = t.type_label if t.type_label in FLOAT_TYPES else "F32"
            self.infos[t.name] = DitTensorInfo(t.name, tuple(shape), dtype, t)
        self.weight_map = {k: self.root for k in self.infos}
        self.raw_weight_map = self.weight_map
        self._fd: int | None = None

    def _orig_shape(self, t: GgufTensor) -> tuple[int, ...] | None:
        """``comfy.gguf.orig_shape.<name>``: an INT32 array of positive sizes holding the tensor's values."""
        import math

        key = ORIG_SHAPE + t.name
        f = self.file.get_field(key)
        if f is None:
            return None
        if f.types != (9, 5) or not 1 <= f.count <= 8:  # ARRAY of INT32, as loader.py's get_orig_shape insists
            raise FormatError(
                f"{self.root}: metadata {key} is {self.file.describe(key)}, expected an array of up to 8 INT32",
                hint="ComfyUI-GGUF's loader refuses it too: convert the model again",
                path=self.root,
            )
        shape = tuple(int(v) for v in f.contents())
        if any(d <= 0 for d in shape) or math.prod(shape) != t.n_elements:
            raise FormatError(
                f"{self.root}: metadata {key} gives shape {shape} for tensor {t.name}, which holds "
                f"{t.n_elements} values ({'x'.join(map(str, t.shape))})",
                hint="the file is damaged: convert the model again",
                path=self.root,
            )
        return shape

    # -- what the plan asks ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: object) -> bool:
        return key in self.infos

    def info(self, key: str) -> DitTensorInfo:
        try:
            return self.infos[key]
        except KeyError:
            raise FormatError(f"{self.root}: no tensor named {key!r}", path=self.root) from None

    def tensor_key(self, module: str, suffix: str = "weight") -> str | None:
        if getattr(self, "_matcher", None) is None:
            from loratools.checkpoint.keymap import KeyMatcher

            self._matcher = KeyMatcher(self.keys())
        return self._matcher.tensor_key(module, suffix)

    def file_of(self, key: str) -> Path:
        self.info(key)
        return self.root

    def metadata(self, path: Path) -> dict[str, str]:
        """The string key/values (an earlier merge's ``loratools.provenance`` among them), as safetensors
        metadata is read."""
        return {name: f.contents() for name, f in self.file.fields.items() if f.types == (8,)}  # STRING

    def keys_in(self, path: Path) -> list[str]:
        return self.keys() if Path(path) == self.root else []

    @property
    def total_bytes(self) -> int:
        return self.root.stat().st_size

    def fd(self) -> int:
        import os

        if self._fd is None:
            self._fd = os.open(self.root, os.O_RDONLY)
        return self._fd

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` dequantized to fp32 in its logical shape (a fresh tensor)."""
        import os

        import numpy as np
        import torch

        from loratools.errors import UnsupportedError

        info = self.info(key)
        t = info.tensor
        raw = os.pread(self.fd(), int(t.n_bytes), int(t.data_offset))
        if len(raw) != int(t.n_bytes):
            raise FormatError(f"{self.root}: tensor {key} ends past the end of the file", path=self.root)
        stored = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        try:
            if info.stored_type in FLOAT_TYPES:
                dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[info.stored_type]
                w = stored.view(dtype).float()
            else:  # the gguf package's own dequantization (the merge's fast Q8_0 path gives the same values)
                import gguf

                byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, t.tensor_type)
                with np.errstate(invalid="ignore", over="ignore"):
                    values = gguf.quants.dequantize(stored.numpy().reshape(byte_shape), t.tensor_type)
                w = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        except NotImplementedError:
            raise UnsupportedError(
                f"{self.root}: tensor {key} is stored as {info.stored_type}, which the gguf package cannot "
                "dequantize",
                path=self.root,
            ) from None
        return w.reshape(info.shape).clone()

    def close(self) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


__all__ = [
    "DIFFUSION_ARCHS", "DitTensorInfo", "GgufDitBase", "gguf_architecture", "is_diffusion_gguf",
    "open_gguf_checkpoint", "peek_architecture",
]  # fmt: skip
