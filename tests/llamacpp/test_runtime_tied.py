"""Tied bases (issue 22 §1.1, §1.2): the output matmul reuses ``token_embd``, and llama.cpp finds a LoRA by
tensor name, so an embedding LoRA's ``lora_a`` (n_vocab, r) lands in the output matmul too and the runtime
aborts (``GGML_ASSERT(ggml_can_mul_mat(a, b))``, shown here). So ``validate --target llama.cpp`` and
``convert --to gguf`` refuse it with the way out, and ``merge`` into the GGUF base unties: ``output.weight``
keeps the original embeddings (llama, qwen2/3, gemma3, phi3 loaders take one), which gives PEFT's logits.
Gemma 2 always reuses ``token_embd`` (its loader takes no ``output.weight``): refused, no merge hint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_to_gguf import convert
from llamacpp_support import TOL, hf_logits, max_diff, run_cli, run_logits
from test_runtime_adapters import peft_adapter
from tiny_models import VOCAB, build


@pytest.fixture(scope="module", params=["llama-tied", "gemma2"])
def tied(request, runtime, tmp_path_factory):
    arch = request.param
    work = tmp_path_factory.mktemp(arch)
    folder, model = build(arch, work / "base")
    base_logits = hf_logits(model)
    gguf = convert(folder, work / "base.gguf")
    noise = max_diff(run_logits(gguf).ok(), base_logits)
    peft_model = peft_adapter(model, work / "lora", ["embed_tokens", "q_proj", "down_proj"])
    return arch, folder, gguf, work / "lora", hf_logits(peft_model), max(TOL, 2 * noise)


def test_runtime_aborts_on_token_embd_lora_of_tied_base(tied, tmp_path):
    """The finding behind the refusals: a token_embd pair on a tied base kills the process."""
    import gguf

    arch, _, base, *_ = tied
    path = tmp_path / "embd.gguf"
    w = gguf.GGUFWriter(path, arch.removesuffix("-tied"))
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight.lora_a", rng.standard_normal((VOCAB, 4)).astype(np.float32))
    w.add_tensor("token_embd.weight.lora_b", rng.standard_normal((64, 4)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = run_logits(base, path)
    assert r.logits is None and r.returncode != 0
    assert "ggml_can_mul_mat" in r.stderr, r.stderr[-1000:]
    # validate on the GGUF adapter alone: Gemma 2 always ties (error); elsewhere only the base can tell
    code, out, _ = run_cli(["validate", path, "--target", "llama.cpp", "--json"])
    found = {f["code"]: f["severity"] for f in json.loads(out)["findings"]}
    assert found.get("llama.cpp.tied_embedding") == ("error" if arch == "gemma2" else "warning"), out
    assert code == (1 if arch == "gemma2" else 0)
    code, out, _ = run_cli(["validate", path, "--target", "llama.cpp", "--base", base, "--json"])
    assert code == 1 and "llama.cpp.tied_embedding" in out


@pytest.mark.parametrize("against", ["hf", "gguf"])
def test_validate_and_convert_refuse(tied, against, tmp_path):
    arch, folder, base, lora, *_ = tied
    on = folder if against == "hf" else base
    code, out, _ = run_cli(["validate", lora, "--target", "llama.cpp", "--base", on, "--json"])
    assert code == 1, out
    found = [f for f in json.loads(out)["findings"] if f["code"] == "llama.cpp.tied_embedding"]
    assert len(found) == 1 and found[0]["module"] == "model.embed_tokens", out
    if arch == "gemma2":
        assert "always uses token_embd" in found[0]["hint"] and "loratools merge" not in found[0]["hint"]
    else:
        assert "loratools merge BASE.gguf" in found[0]["hint"]
    code, _, err = run_cli(["convert", lora, "--to", "gguf", "--base", on, "-o", tmp_path / "a.gguf"])
    assert code != 0 and "ties lm_head" in err and not (tmp_path / "a.gguf").exists()


def test_merge_unties_or_refuses(tied, tmp_path):
    arch, _, base, lora, want, tol = tied
    out = tmp_path / "merged.gguf"
    code, stdout, err = run_cli(["merge", base, lora, "-o", out, "--verify", "--json"])
    if arch == "gemma2":
        assert code != 0 and "always uses token_embd" in err and "loratools merge" not in err
        assert not out.exists()
        return
    assert code == 0, err
    assert json.loads(stdout)["untied"] == ["output.weight", "token_embd.weight"]
    diff = max_diff(run_logits(out).ok(), want)
    assert diff < tol, f"{arch}: merged {diff} off PEFT"


def test_lm_head_lora_merged_into_tied_gguf(runtime, tmp_path):
    """An lm_head LoRA on a tied base (PEFT's unmerged model changes the output side only): merged, the
    untied output.weight = token_embd + ΔW; as a runtime adapter it is refused with that way out."""
    folder, model = build("llama-tied", tmp_path / "base")
    base = convert(folder, tmp_path / "base.gguf")
    peft_model = peft_adapter(model, tmp_path / "lora", ["lm_head", "embed_tokens", "v_proj"])
    want = hf_logits(peft_model)
    code, _, err = run_cli(["convert", tmp_path / "lora", "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf"])
    assert code != 0 and "loratools merge BASE.gguf" in err
    code, _, err = run_cli(["merge", base, tmp_path / "lora", "-o", tmp_path / "m.gguf", "--verify"])
    assert code == 0, err
    assert max_diff(run_logits(tmp_path / "m.gguf").ok(), want) < TOL
