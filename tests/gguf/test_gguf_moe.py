"""Expert LoRA merged into a GGUF MoE base's stacked ffn_{gate,up,down}_exps tensors (issue 20 item 2), without the
runtime (tests/llamacpp/test_runtime_moe.py runs the merged models in llama.cpp): the Qwen3-MoE fixture written as
F32 / F16 / Q8_0 GGUF (tests/moe_gguf.py), its PEFT ``target_parameters`` adapter and the same adapter as per-expert
modules. Oracles: PEFT's own ΔW per expert (ParamWrapper.get_delta_weight) read back with the gguf package; the
experts an adapter leaves alone stay byte for byte."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_support import run_cli
from moe_gguf import QWEN3_MOE, QWEN3_MOE_LORA, write_moe_gguf

from loratools.files.safetensors_file import load_file, save_file


@pytest.fixture(scope="module")
def peft_deltas() -> dict[str, np.ndarray]:
    """GGUF stacked tensor -> PEFT's ΔW (E, out, in) of the fixture adapter, gate_up_proj split on its rows."""
    import peft.utils.transformers_weight_conversion as conversion
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conversion, "convert_peft_config_for_transformers", lambda *a, **k: None)
        model = AutoModelForCausalLM.from_pretrained(str(QWEN3_MOE), dtype=torch.float32)
        pm = PeftModel.from_pretrained(copy.deepcopy(model), str(QWEN3_MOE_LORA)).eval()
    out = {}
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            layer = int(name.split("layers.")[1].split(".")[0])
            delta = module.get_delta_weight("default").detach().float().numpy()
            if module.parameter_name == "gate_up_proj":
                half = delta.shape[1] // 2
                out[f"blk.{layer}.ffn_gate_exps.weight"] = delta[:, :half]
                out[f"blk.{layer}.ffn_up_exps.weight"] = delta[:, half:]
            else:
                out[f"blk.{layer}.ffn_down_exps.weight"] = delta
    assert len(out) == 6
    return out


def _tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _values(t) -> np.ndarray:  # noqa: ANN001
    import gguf

    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist())


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_each_expert_gets_peft_delta(tmp_path: Path, peft_deltas, outtype: str) -> None:
    base = write_moe_gguf(tmp_path / "base.gguf", outtype)
    out = tmp_path / "merged.gguf"
    code, text, err = run_cli(["merge", base, QWEN3_MOE_LORA, "-o", out, "--verify"])
    assert code == 0, err
    before, after = _tensors(base), _tensors(out)
    assert [*before] == [*after]
    for name in before:
        old, new = before[name], after[name]
        assert new.tensor_type == old.tensor_type and tuple(new.shape) == tuple(old.shape), name
        if name not in peft_deltas:  # attention, norms, router: untouched, byte for byte
            assert np.array_equal(np.asarray(old.data).view(np.uint8), np.asarray(new.data).view(np.uint8)), name
            continue
        want = _values(old) + peft_deltas[name]
        got = _values(new)
        if new.tensor_type.name == "F32":
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        elif new.tensor_type.name == "F16":  # the nearest F16, or its neighbour where fp32 rounding differs
            assert (np.abs(got - want) <= np.spacing(np.abs(want).astype(np.float16)).astype(np.float32)).all()
        else:  # one Q8_0 step of each 32-value block
            step = np.abs(want).reshape(*want.shape[:-1], -1, 32).max(-1, keepdims=True) / 127
            err_blocks = np.abs(got - want).reshape(*want.shape[:-1], -1, 32)
            assert (err_blocks <= step + 1e-7).all(), name
        assert float(np.abs(got - _values(old)).max()) > 1e-3  # the adapter moved each stacked tensor


def _one_expert(tmp_path: Path, expert: int) -> Path:
    """The fixture adapter as per-expert modules (convert --to vllm-moe), only expert ``expert``'s kept."""
    out = tmp_path / "per-expert"
    code, _, err = run_cli(["convert", QWEN3_MOE_LORA, "--to", "vllm-moe", "-o", out])
    assert code == 0, err
    tensors, meta = load_file(out / "adapter_model.safetensors")
    meta.pop("loratools.experts", None)
    kept = {k: v for k, v in tensors.items() if ".experts." not in k or f".experts.{expert}." in k}
    assert len(kept) < len(tensors)
    save_file(kept, str(out / "adapter_model.safetensors"), metadata=meta)
    return out


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_untouched_experts_stay_byte_for_byte(tmp_path: Path, peft_deltas, outtype: str) -> None:
    """A per-expert adapter on expert 2 only: experts 0, 1, 3 of every stacked tensor are copied as they lie (the
    slices are written back to back, the tensor padded once), expert 2 takes PEFT's ΔW of expert 2."""
    base = write_moe_gguf(tmp_path / "base.gguf", outtype)
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(["merge", base, _one_expert(tmp_path, 2), "-o", out, "--verify"])
    assert code == 0, err
    before, after = _tensors(base), _tensors(out)
    for name, delta in peft_deltas.items():
        old, new = np.asarray(before[name].data), np.asarray(after[name].data)
        for e in (0, 1, 3):
            assert np.array_equal(old[e].view(np.uint8), new[e].view(np.uint8)), (name, e)
        got = _values(after[name])[2] - _values(before[name])[2]
        assert np.abs(got - delta[2]).max() <= 0.02 * np.abs(delta[2]).max() + 1e-2, name


def test_expert_count_and_dims_must_match(tmp_path: Path) -> None:
    """A base of 3 experts, or of narrower experts: one line naming the tensor and both sizes, nothing written."""
    for label, kw, expect in (
        ("experts", {"experts": 3}, "the adapter holds 4 experts, base tensor blk.0.ffn_down_exps.weight [3, 32, 24]"),
        ("dims", {"ffn": 16}, "base tensor blk.0.ffn_down_exps.weight holds experts of [32, 16]"),
    ):
        base = write_moe_gguf(tmp_path / f"{label}.gguf", **kw)
        code, _, err = run_cli(["merge", base, QWEN3_MOE_LORA, "-o", tmp_path / f"{label}-m.gguf"])
        assert code == 2 and expect in err and err.count("Error:") == 1, err
        assert not (tmp_path / f"{label}-m.gguf").exists()


def test_one_expert_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory O(one expert slice): the fp32 work buffer and the byte buffers never hold more than one expert of a
    stacked tensor (the largest one here: 24 × 32 values), while each tensor holds 4."""
    from loratools.ops.merge import gguf_tensors
    from loratools.ops.merge.gguf import merge_gguf

    asked: list[int] = []
    work, stored = gguf_tensors.Scratch.work, gguf_tensors.Scratch.stored
    monkeypatch.setattr(gguf_tensors.Scratch, "work", lambda self, n: (asked.append(n), work(self, n))[1])
    monkeypatch.setattr(
        gguf_tensors.Scratch, "stored", lambda self, n: (asked.append(n // 2), stored(self, n))[1]
    )  # F16 bytes
    base = write_moe_gguf(tmp_path / "base.gguf", "f16")
    merge_gguf(base, [QWEN3_MOE_LORA], tmp_path / "merged.gguf", verify=True)
    assert asked and max(asked) == 24 * 32, max(asked)
