"""`.onnx_adapter` files for onnxruntime-genai models (issue 14.5), run by onnxruntime-genai itself.

fixtures/genai/llama-lora-slots was built by onnxruntime-genai's model builder (fixtures/make_genai_fixture.py):
its LoRA inputs are named after the builder's module paths (``model.layers.0.attn.q_proj.lora_A.weight``,
not the checkpoint's ``self_attn``) and take one static rank (8). ``convert --to onnx-adapter --for`` reads
names, sizes and rank from the graph; the adapter's ranks 2/4/6 are zero-padded to 8. The oracle: PEFT's
logits for the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import models
import numpy as np
import pytest
from onnx_support import run_cli

og = pytest.importorskip("onnxruntime_genai")

GENAI = Path(__file__).resolve().parents[2] / "fixtures" / "genai"
MODEL = GENAI / "llama-lora-slots"
BASE, PATTERNS = GENAI / "llama-base", GENAI / "llama-patterns"
IDS = [3, 17, 42, 5, 88, 9, 61, 30]


@pytest.fixture(scope="module")
def genai_model():
    return og.Model(str(MODEL))


def genai_logits(model, adapter_file: Path | None = None) -> np.ndarray:
    """onnxruntime-genai's logits for IDS (one prefill), with ``adapter_file`` active through og.Adapters."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=32)
    generator = og.Generator(model, params)
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "a")
        generator.set_active_adapter(adapters, "a")
    generator.append_tokens(np.array([IDS], dtype=np.int32))
    return np.array(generator.get_output("logits")).reshape(len(IDS), -1)


@pytest.fixture(scope="module")
def references():
    """PEFT's logits with the patterns adapter, and the base model's."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(BASE)).eval()
    ids = torch.tensor([IDS])
    with torch.no_grad():
        plain = base(input_ids=ids).logits[0].numpy()
        peft = PeftModel.from_pretrained(base, str(PATTERNS)).eval()
        tuned = peft(input_ids=ids).logits[0].numpy()
    return plain, tuned


def test_adapter_fits_the_builder_graph_and_matches_peft(genai_model, references, tmp_path):
    plain, tuned = references
    assert np.abs(tuned - plain).max() > 1e-2  # the adapter moves the logits far beyond the tolerance
    assert np.abs(genai_logits(genai_model) - plain).max() <= 1e-4  # no adapter: the base model
    out = tmp_path / "patterns.onnx_adapter"
    code, stdout, err = run_cli(["convert", PATTERNS, "--to", "onnx-adapter", "--for", MODEL / "model.onnx", "-o", out])
    assert code == 0, err
    assert stdout.splitlines() == [f"wrote {out} (onnx-adapter, 8 adapter modules, from peft)"]
    assert np.abs(genai_logits(genai_model, out) - tuned).max() <= 1e-4


def test_names_and_padded_ranks_come_from_the_graph(tmp_path):
    import onnxruntime as ort

    from loratools.formats.adapter_io import load_adapter, save_adapter

    save_adapter(load_adapter(PATTERNS), tmp_path / "a.onnx_adapter", format="onnx-adapter", model=MODEL)
    params = ort.AdapterFormat.read_adapter(str(tmp_path / "a.onnx_adapter")).get_parameters()
    assert "model.layers.0.attn.q_proj.lora_A.weight" in params and len(params) == 16
    a = params["model.layers.0.attn.v_proj.lora_A.weight"].numpy()  # rank 2 in the adapter
    b = params["model.layers.0.attn.v_proj.lora_B.weight"].numpy()
    assert a.shape == (32, 8) and b.shape == (8, 16)
    assert not a[:, 2:].any() and not b[2:].any() and a[:, :2].any()


def test_a_rank_above_the_graphs_is_refused_with_the_way_out(tmp_path):
    from transformers import LlamaForCausalLM

    big = tmp_path / "r16"
    models.make_peft(LlamaForCausalLM.from_pretrained(str(BASE)), big, kind="llama", r=16, lora_alpha=32,
                     target_modules=["q_proj"])  # fmt: skip
    code, out, err = run_cli(["convert", big, "--to", "onnx-adapter", "--for", MODEL, "-o", tmp_path / "x"])
    assert code == 2 and not out
    assert err.splitlines() == [
        f"Error: {MODEL / 'model.onnx'}: module model.layers.0.self_attn.q_proj has rank 16; the graph's LoRA "
        "inputs (model.layers.0.attn.q_proj) take rank 8",
        f"Hint: lower the rank first: loratools resize {big} --rank 8 -o SMALLER, then convert that",
    ]
    assert not (tmp_path / "x").exists()
    code, out, err = run_cli(["resize", big, "--rank", "8", "-o", tmp_path / "r8"])  # the way out works
    assert code == 0, err
    code, out, err = run_cli(["convert", tmp_path / "r8", "--to", "onnx-adapter", "--for", MODEL, "-o", tmp_path / "y"])
    assert code == 0, err


def test_validate_against_the_genai_model(tmp_path):
    from transformers import LlamaForCausalLM

    code, out, err = run_cli(["validate", PATTERNS, "--target", "onnxruntime-genai", "--base", MODEL])
    assert code == 0, out + err
    assert out.splitlines() == [f"{PATTERNS} (peft, 8 modules, against {MODEL}): OK, no problems found"]
    models.make_peft(LlamaForCausalLM.from_pretrained(str(BASE)), tmp_path / "k", kind="llama",
                     target_modules=["k_proj"])  # fmt: skip
    code, out, err = run_cli(["validate", tmp_path / "k", "--target", "onnxruntime-genai", "--base", MODEL])
    assert code == 1
    assert (
        f"  error   onnxruntime-genai.lora_inputs: {MODEL / 'model.onnx'}: the slot graph has no LoRA slot for "
        "2 module(s): model.layers.0.self_attn.k_proj, model.layers.1.self_attn.k_proj"
    ) in out.splitlines()


def _olive_dynamic(folder: Path) -> Path:
    """The fixture as Olive's default ExtractAdapters writes it: one rank symbol ``lora_r``, zero-rank defaults."""
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(MODEL, folder)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for value in proto.graph.input:
        if ".lora_" in value.name:
            dims = value.type.tensor_type.shape.dim
            dims[1 if ".lora_A." in value.name else 0].dim_param = "lora_r"
    for tensor in proto.graph.initializer:
        if ".lora_" in tensor.name:
            shape = [0 if d == 8 else d for d in tensor.dims]
            tensor.CopyFrom(numpy_helper.from_array(np.zeros(shape, dtype=np.float32), tensor.name))
    onnx.save(proto, str(folder / "model.onnx"))
    return folder


def test_a_shared_rank_symbol_gets_the_adapters_largest_rank(genai_model, references, tmp_path):
    import onnxruntime as ort

    from loratools.formats.adapter_io import load_adapter, save_adapter

    folder = _olive_dynamic(tmp_path / "dynamic")
    save_adapter(load_adapter(PATTERNS), tmp_path / "a.onnx_adapter", format="onnx-adapter", model=folder)
    params = ort.AdapterFormat.read_adapter(str(tmp_path / "a.onnx_adapter")).get_parameters()
    ranks = {p.numpy().shape[1] for n, p in params.items() if ".lora_A." in n}
    assert ranks == {6}  # ranks 2, 4 and 6 all padded to the largest
    _, tuned = references
    assert np.abs(genai_logits(og.Model(str(folder)), tmp_path / "a.onnx_adapter") - tuned).max() <= 1e-4
