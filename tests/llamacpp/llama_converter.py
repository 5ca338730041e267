"""llama.cpp's own ``convert_hf_to_gguf.py`` as a base converter for the tests, where it is set up.

It needs a venv of its own (transformers 4.57.6, numpy 2.2, torch; see ../shared/tools/llama_cpp_runtime/README.md)
and the llama.cpp source folder (``vendor/llama.cpp`` of the ``llama-cpp-python==0.3.36`` sdist):
``LORATOOLS_LLAMA_CONVERTER=PYTHON:LLAMA_CPP_DIR``. Run as this file in that venv, it runs the converter with
one change: the pre-tokenizer check (a hash of known tokenizers' output) answers ``default`` for the tests'
own tokenizer, as it would with ``convert_hf_to_gguf_update.py`` run for it. Tensors, names, stacking and
hyperparameters are the converter's own. :func:`save_tokenizer` gives a model folder the tokenizer.json the
converter reads with transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = "LORATOOLS_LLAMA_CONVERTER"
#: where the project's shared scratch set-up put it (used when the variable is not set)
DEFAULT = ("/work/scratch/llconv/venv/bin/python", "/work/scratch/llconv/llama_cpp_python-0.3.36/vendor/llama.cpp")


def converter() -> tuple[Path, Path] | None:
    """(python, llama.cpp folder) of the converter, or None when it is not set up here."""
    value = os.environ.get(ENV)
    py, src = value.split(":", 1) if value else DEFAULT
    if Path(py).is_file() and (Path(src) / "convert_hf_to_gguf.py").is_file():
        return Path(py), Path(src)
    return None


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """The tests' byte-level BPE (llamacpp_support.tokenizer) as ``tokenizer.json`` + config in ``folder``."""
    from llamacpp_support import tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = tokenizer(vocab_size)
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=tokens[0], eos_token=tokens[1]).save_pretrained(folder)
    config = folder / "tokenizer_config.json"  # transformers 5 names its own backend class; the converter has 4.57
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))


def convert_with_llama_cpp(src: Path, dst: Path, outtype: str = "f32") -> Path:
    """``src`` (a saved transformers folder) converted by llama.cpp's convert_hf_to_gguf.py to ``dst``."""
    found = converter()
    assert found is not None, f"no llama.cpp converter (set {ENV}=PYTHON:LLAMA_CPP_DIR)"
    py, llama = found
    if not (src / "tokenizer.json").is_file():
        save_tokenizer(src, json.loads((src / "config.json").read_text())["vocab_size"])
    args = [str(py), __file__, str(llama), str(src), "--outfile", str(dst), "--outtype", outtype]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and dst.is_file(), f"convert_hf_to_gguf.py failed: {r.stderr[-3000:]}"
    return dst


def _run(llama: str, argv: list[str]) -> None:
    import runpy

    sys.path[:0] = [llama, f"{llama}/gguf-py"]
    import conversion.base as base  # the converter's own package

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    runpy.run_path(f"{llama}/convert_hf_to_gguf.py", run_name="__main__")


if __name__ == "__main__":
    _run(sys.argv[1], sys.argv[2:])
