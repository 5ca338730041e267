"""libllama's own ``llama_model_quantize`` (the C API behind ``llama-quantize``) for the tests, through the
runtime venv's cffi bindings (llamacpp_support.VENV): a GGUF base quantized as llama.cpp quantizes it, K-quants
and gpt-oss's MXFP4 experts included. Run as this file in that venv: ``python llama_quantize.py IN OUT FTYPE``
(``FTYPE``: a ``LLAMA_FTYPE_MOSTLY_*`` suffix such as ``Q4_K_M``, ``Q6_K`` or ``MXFP4_MOE``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def quantize(src: Path, dst: Path, ftype: str) -> Path:
    from llamacpp_support import VENV

    r = subprocess.run([str(VENV / "bin" / "python"), __file__, str(src), str(dst), ftype], capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0 and dst.is_file(), f"llama_model_quantize failed: {r.stderr[-3000:]}"
    return dst


def _main(src: str, dst: str, ftype: str) -> None:
    from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

    ffi, lib = get_ffi(), get_lib()
    lib.llama_backend_init()
    params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    sys.exit(int(lib.llama_model_quantize(src.encode(), dst.encode(), params)))


if __name__ == "__main__":
    _main(*sys.argv[1:4])
