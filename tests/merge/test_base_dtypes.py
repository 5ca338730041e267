"""A plain base tensor's dtype decides what merge may write: an integer weight is refused in one line (it is
packed data), a float8 weight without a scale is written as BF16 (rounding back to e4m3 would drop the update)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from merge_support import make_case, peft_merged_state
from safetensors.torch import save_file

from loratools.cli.main import main
from loratools.files.safetensors_file import load_file


@pytest.fixture(scope="module")
def case(tmp_module: Path):
    return make_case(tmp_module / "case", "llama")


def _retyped(case, tmp: Path, fn) -> Path:  # noqa: ANN001
    """The case's base with every touched q_proj weight passed through ``fn``."""
    base = tmp / "base"
    shutil.copytree(case.base, base)
    f = base / "model.safetensors"
    tensors, meta = load_file(f)
    for k in tensors:
        if k.endswith("q_proj.weight"):
            tensors[k] = fn(tensors[k])
    save_file(tensors, str(f), metadata=meta)
    return base


def _run(args: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    got = capsys.readouterr()
    return exc.value.code, got.out, got.err


def test_integer_base_weight_is_refused(case, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    base = _retyped(case, tmp_path, lambda t: (t * 100).round().clamp(0, 255).to(torch.uint8))
    out = tmp_path / "out"
    code, _, err = _run(["merge", base, case.adapter, "-o", out], capsys)
    assert code == 2, err
    assert err.startswith("Error: ") and "Traceback" not in err and "internal error" not in err
    assert "q_proj.weight is U8" in err and "model.safetensors" in err, err
    assert not out.exists()


def test_plain_float8_base_is_written_bf16(case, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    base = _retyped(case, tmp_path, lambda t: t.to(torch.float8_e4m3fn))
    out = tmp_path / "out"
    code, stdout, err = _run(["merge", base, case.adapter, "-o", out, "--json"], capsys)
    assert code == 0, err
    notes = json.loads(stdout)["notes"]
    assert len(notes) == 1 and "written as BF16" in notes[0], notes
    merged, _ = load_file(out / "model.safetensors")
    based, _ = load_file(base / "model.safetensors")
    ref = peft_merged_state(case)
    key = next(k for k in merged if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert merged[key].dtype == torch.bfloat16
    # deq(W) + ΔW: the PEFT delta over the float8 base, one rounding to bf16
    delta = ref[key] - case.model.state_dict()[key]
    assert delta.abs().max() > 1e-3, "the adapter barely changes the weight"
    want = (based[key].float() + delta).to(torch.bfloat16)
    assert (merged[key].float() - want.float()).abs().max() <= 2 * float(want.float().abs().max()) * 2**-8
    untouched = next(k for k in merged if k.endswith("layers.0.mlp.up_proj.weight"))
    assert merged[untouched].dtype == based[untouched].dtype
