"""In-process fuzzing of every reader: mutated valid inputs give a LoratoolsError or a result, never
anything else, never a hang. Each reader gets 300 derandomized examples in the normal suite (the same
ones every run); ``LORATOOLS_FUZZ_EXAMPLES=2000`` (or more) for a deep run. No deadline: a loaded machine
is slow, not wrong (a call running past fuzz_support.HANG_S is a hang and fails)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fuzz_support import (
    diffusers_names,
    kohya_names,
    mutated_json,
    mutated_safetensors,
    only_loratools_errors,
    peft_names,
    st_bytes,
    tensors,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reliability_support import LLAMA_LORA, ROOT

from loratools.checkpoint.reader import open_checkpoint
from loratools.files.safetensors_file import SafetensorsFile, read_header
from loratools.formats.adapter_io import load_adapter

EXAMPLES = int(os.environ.get("LORATOOLS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
#: this module's scratch folder, made and removed by the ``work`` fixture (never at import: collection alone, in
#: every xdist worker, would leave one behind in the system temp directory)
WORK = Path()
PEFT_CONFIG = json.loads((LLAMA_LORA / "adapter_config.json").read_text())
PEFT_CONFIG.update(r=2, lora_alpha=4, target_modules=["q_proj"])
PEFT_ST = st_bytes(tensors(1, peft_names()), {"format": "pt"})
KOHYA_ST = st_bytes(tensors(2, kohya_names()), {"ss_network_dim": "2", "ss_network_alpha": "4"})
DIFFUSERS_ST = st_bytes(
    tensors(3, diffusers_names()),
    {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4, "text_encoder.r": 2})},
)
BASE_CONFIG = {"model_type": "llama", "tie_word_embeddings": False, "hidden_size": 8}
BASE_SHARDS = [
    st_bytes({"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8), "model.norm.weight": torch.ones(8)}),
    st_bytes({"model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8), "lm_head.weight": torch.randn(4, 8)}),
]
BASE_INDEX = {
    "metadata": {"total_size": 1000},
    "weight_map": {
        "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "model.layers.1.self_attn.q_proj.weight": "model-00002-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    },
}


@pytest.fixture(scope="module", autouse=True)
def work() -> Iterator[Path]:
    global WORK
    with tempfile.TemporaryDirectory(prefix="loratools-fuzz-") as folder:
        WORK = Path(folder)
        yield WORK
    WORK = Path()


def _fresh(name: str) -> Path:
    """The folder for one reader's examples; files are overwritten, so stale ones are removed first."""
    d = WORK / name
    if d.exists():
        for f in d.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    else:
        d.mkdir(parents=True)
    return d


SHARD_NAMES = st.sampled_from(["../x.safetensors", "/etc/passwd", ".hidden", "nope.safetensors", "a\\b", 3, None])
BASE_JSON = {"config": mutated_json(BASE_CONFIG), "index": mutated_json(BASE_INDEX)}
SHARD0 = mutated_safetensors(BASE_SHARDS[0])
PEFT_JSON = mutated_json(PEFT_CONFIG)
PEFT_WEIGHTS = mutated_safetensors(PEFT_ST)


def _read_all(path: Path) -> None:
    f = SafetensorsFile(path)
    try:
        for k in f.keys():
            f.get(k)
    finally:
        f.close()


def _adapter_fully(path: Path) -> None:
    adapter = load_adapter(path)
    for m in adapter.modules.values():
        m.delta()


@FUZZ
@given(data=mutated_safetensors(PEFT_ST))
def test_fuzz_safetensors_reader(data: bytes) -> None:
    p = _fresh("st") / "x.safetensors"
    p.write_bytes(data)
    only_loratools_errors(lambda: read_header(p))
    only_loratools_errors(lambda: _read_all(p))


@FUZZ
@given(which=st.sampled_from(["config", "index", "shard", "shard"]), draw=st.data())
def test_fuzz_checkpoint_reader(which: str, draw: st.DataObject) -> None:
    d = _fresh("base")
    config = draw.draw(BASE_JSON["config"]) if which == "config" else json.dumps(BASE_CONFIG)
    index = draw.draw(BASE_JSON["index"]) if which == "index" else json.dumps(BASE_INDEX)
    if which == "index" and draw.draw(st.booleans()):  # shard names: traversal, missing, odd
        doc = json.loads(json.dumps(BASE_INDEX))
        key = sorted(doc["weight_map"])[draw.draw(st.integers(0, 3))]
        doc["weight_map"][key] = draw.draw(SHARD_NAMES)
        index = json.dumps(doc)
    (d / "config.json").write_text(config)
    (d / "model.safetensors.index.json").write_text(index)
    for i, shard in enumerate(BASE_SHARDS):
        body = draw.draw(SHARD0) if which == "shard" and i == 0 else shard
        (d / f"model-0000{i + 1}-of-00002.safetensors").write_bytes(body)

    def read() -> None:
        with open_checkpoint(d) as reader:
            _ = reader.quantization, reader.tie_word_embeddings, reader.total_bytes
            for k in reader.keys():
                reader.info(k)
                reader.get(k)

    only_loratools_errors(read)


@FUZZ
@given(which=st.sampled_from(["config", "weights", "weights", "both"]), draw=st.data())
def test_fuzz_peft_format(which: str, draw: st.DataObject) -> None:
    d = _fresh("peft")
    config = draw.draw(PEFT_JSON) if which in ("config", "both") else json.dumps(PEFT_CONFIG)
    weights = draw.draw(PEFT_WEIGHTS) if which in ("weights", "both") else PEFT_ST
    (d / "adapter_config.json").write_text(config)
    (d / "adapter_model.safetensors").write_bytes(weights)
    only_loratools_errors(lambda: _adapter_fully(d))


@FUZZ
@given(data=mutated_safetensors(KOHYA_ST))
def test_fuzz_kohya_format(data: bytes) -> None:
    p = _fresh("kohya") / "lora.safetensors"
    p.write_bytes(data)
    only_loratools_errors(lambda: _adapter_fully(p))


@FUZZ
@given(data=mutated_safetensors(DIFFUSERS_ST), folder=st.booleans())
def test_fuzz_diffusers_format(data: bytes, folder: bool) -> None:
    d = _fresh("diffusers")
    p = d / ("pytorch_lora_weights.safetensors" if folder else "lora.safetensors")
    p.write_bytes(data)
    only_loratools_errors(lambda: _adapter_fully(d if folder else p))


@pytest.fixture(scope="module")
def onnx_adapter_seed() -> bytes:
    pytest.importorskip("onnxruntime")
    from loratools.formats.adapter_io import save_adapter

    adapter = load_adapter(LLAMA_LORA)
    out = WORK / "seed.onnx_adapter"
    if out.exists():
        out.unlink()
    save_adapter(adapter, out, format="onnx-adapter")
    return out.read_bytes()


def _flip(seed: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    raw = bytearray(seed)
    for pos, val in edits:
        raw[pos % len(raw)] = val
    return bytes(raw[:cut] if cut is not None else raw)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8), cut=st.none() | st.integers(0)
)
def test_fuzz_onnx_adapter_format(onnx_adapter_seed: bytes, edits: list, cut: int | None) -> None:
    p = _fresh("onnx") / "a.onnx_adapter"
    p.write_bytes(_flip(onnx_adapter_seed, edits, None if cut is None else cut % len(onnx_adapter_seed)))
    only_loratools_errors(lambda: _adapter_fully(p))


@pytest.fixture(scope="module")
def bin_seed() -> bytes:
    p = WORK / "seed.bin"
    torch.save(tensors(4, peft_names()), p)
    return p.read_bytes()


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8), cut=st.none() | st.integers(0)
)
@example(edits=[(403, 133)], cut=None)  # torch's own `assert isinstance(..., dict)` (AssertionError) once escaped
def test_fuzz_pickle_bin_reader(bin_seed: bytes, edits: list, cut: int | None) -> None:
    d = _fresh("bin")
    (d / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    (d / "adapter_model.bin").write_bytes(_flip(bin_seed, edits, None if cut is None else cut % len(bin_seed)))
    only_loratools_errors(lambda: _adapter_fully(d))


MEMORY_SCRIPT = r"""
import json, os, resource, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch
torch.set_num_threads(1)
import fuzz_support as fs
from hypothesis import given, settings, HealthCheck, strategies as st
from loratools.formats.adapter_io import load_adapter
from loratools.checkpoint.reader import open_checkpoint
from loratools.files.safetensors_file import MAX_HEADER_BYTES
from pathlib import Path
load_adapter(sys.argv[3])  # warm every lazy import before the limit
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
limit = vm + 2 * MAX_HEADER_BYTES + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
work = Path(sys.argv[4])
seed = fs.st_bytes(fs.tensors(1, fs.peft_names()), {"format": "pt"})
huge = st.sampled_from([2**20, 2**28, 2**31, 2**40])
@settings(max_examples=int(sys.argv[5]), deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(dims=st.lists(huge, min_size=1, max_size=3), end=huge, which=st.sampled_from(["adapter", "base"]))
def run(dims, end, which):
    header, body = fs.split(seed)
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name] = {"dtype": "F32", "shape": dims, "data_offsets": [0, end]}
    (work / "adapter_model.safetensors").write_bytes(fs.join(header, body))
    (work / "model.safetensors").write_bytes(fs.join(header, body))
    fs.only_loratools_errors(lambda: load_adapter(work) if which == "adapter" else open_checkpoint(work).get(name))
run()
print("bounded", limit >> 20, "MiB")
"""


def test_memory_stays_bounded_under_an_address_space_limit(tmp_path: Path) -> None:
    """Huge shapes and offsets, read with RLIMIT_AS = what the process already maps + 2 header caps:
    an allocation sized from a header would raise MemoryError/RuntimeError and fail the run."""
    shutil.copy(LLAMA_LORA / "adapter_config.json", tmp_path)
    shutil.copy(LLAMA_LORA / "adapter_model.safetensors", tmp_path)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_SCRIPT,
            str(tests),
            str(ROOT),
            str(LLAMA_LORA),
            str(tmp_path),
            str(EXAMPLES // 3),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bounded" in r.stdout


def test_fuzzing_leaves_nothing_in_the_temp_dir(tmp_path: Path) -> None:
    """Collecting and running this module (two fuzzers, a few examples) leaves no loratools-* folder in TMPDIR."""
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "LORATOOLS_FUZZ_EXAMPLES": "3"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-k",
         "pickle_bin_reader or kohya_format", "--basetemp", str(tmp_path / "base"), __file__],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert not [p.name for p in temp.iterdir() if p.name.startswith("loratools")]
