"""Inputs merge must refuse: exit 2 with one clear line, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from merge_support import make_case, perturb
from safetensors.torch import save_file

from loratools.cli.main import main
from loratools.files.safetensors_file import load_file


@pytest.fixture(scope="module")
def case(tmp_module: Path):
    return make_case(tmp_module / "case", "llama")


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the fixtures printed
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err


def _assert_refused(args: list[str], out: Path, capsys, needle: str) -> None:  # noqa: ANN001
    code, err = _run(args, capsys)
    assert code == 2, err
    assert needle in err, err
    assert err.startswith("Error: ") and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.loratools-")]


def test_dora_with_weight(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    c = make_case(
        tmp_path, "llama", peft_kw={"use_dora": True}, mutate=lambda p: perturb(p, "magnitude_vector.default.weight")
    )
    out = tmp_path / "out"
    _assert_refused(["merge", c.base, c.adapter, "-o", out, "--weights", "0.5"], out, capsys, "DoRA")


def test_missing_module(case, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    other = make_case(tmp_path, "llama", model_kw={"num_hidden_layers": 3})
    out = tmp_path / "out"
    _assert_refused(["merge", case.base, other.adapter, "-o", out], out, capsys, "model.layers.2")


def test_shape_mismatch(case, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    other = make_case(tmp_path, "llama", model_kw={"intermediate_size": 40})
    out = tmp_path / "out"
    _assert_refused(["merge", case.base, other.adapter, "-o", out], out, capsys, "shape")


def test_nan_in_adapter(case, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    bad = tmp_path / "nan"
    shutil.copytree(case.adapter, bad)
    tensors, meta = load_file(bad / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata=meta)
    out = tmp_path / "out"
    _assert_refused(["merge", case.base, bad, "-o", out], out, capsys, "NaN")


def test_quantized_base(case, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    q = tmp_path / "q"
    shutil.copytree(case.base, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_refused(["merge", q, case.adapter, "-o", out], out, capsys, "quantized")


def test_output_inside_input(case, capsys) -> None:  # noqa: ANN001
    out = case.base / "merged"
    _assert_refused(["merge", case.base, case.adapter, "-o", out], out, capsys, "inside the input")


def test_no_cuda_is_a_clear_error(case, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    _assert_refused(["merge", case.base, case.adapter, "-o", out, "--device", "cuda"], out, capsys, "CUDA")


def test_cli_summary_and_verify(case, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(case.base), str(case.adapter), "-o", str(out), "--verify"])
    assert exc.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("merged into") and ": 8 base tensors changed," in line
    assert "(verified)" in line and "\n" not in line
    code, err = _run(["merge", case.base, case.adapter, "-o", out], capsys)
    assert code == 2 and "--overwrite" in err
