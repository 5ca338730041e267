"""Every numeric option of every command: finite and in range, a usage error otherwise (issue 14.16).

``merge --weights nan --verify`` used to exit 0 "(verified)", ``rescale --scale nan`` wrote
``"lora_alpha": NaN`` and ``--weights 1e39`` was an internal error. The CLI and the library refuse the
same values through one check (loratools/numeric_args.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from reliability_support import LLAMA_BASE, LLAMA_LORA, assert_one_line_error, invoke

from loratools.errors import UsageError

TUNED = LLAMA_BASE.parent / "llama-tuned"
NON_FINITE = ["nan", "inf", "-inf", "1e39"]

#: command -> (argv before the numeric option, with {out} for the output, [(option, bad values)])
CASES = {
    "merge": (["merge", LLAMA_BASE, LLAMA_LORA, "-o", "{out}"], [("--weights", [*NON_FINITE, "1,nan"])]),
    "verify": (["verify", LLAMA_BASE, "--base", LLAMA_BASE, "--adapter", LLAMA_LORA], [("--weights", NON_FINITE)]),
    "rescale-scale": (["rescale", LLAMA_LORA, "-o", "{out}"], [("--scale", [*NON_FINITE, "0"])]),
    "rescale-alpha": (["rescale", LLAMA_LORA, "-o", "{out}"], [("--alpha", [*NON_FINITE, "0", "-2"])]),
    "resize": (
        ["resize", LLAMA_LORA, "-o", "{out}"],
        [
            ("--rank", ["0", "-1", "nan", "2.5"]),
            ("--fro", [*NON_FINITE, "0", "1.5"]),
            ("--ratio", [*NON_FINITE, "0.5"]),
            ("--cumulative", [*NON_FINITE, "0", "2"]),
            ("--budget", ["-1", "nan", "inf"]),
        ],
    ),
    "resize-caps": (
        ["resize", LLAMA_LORA, "--rank", "2", "-o", "{out}"],
        [("--max-rank", ["0", "nan"]), ("--conv-rank", ["0", "inf"])],
    ),
    "combine": (
        ["combine", LLAMA_LORA, LLAMA_LORA, "--method", "ties", "-o", "{out}"],
        [("--weights", ["nan,1", "1,inf", "1e39,1"]), ("--density", [*NON_FINITE, "0", "1.5"])],
    ),
    "combine-rank": (
        ["combine", LLAMA_LORA, LLAMA_LORA, "--method", "svd", "-o", "{out}"],
        [("--rank", ["0", "nan"]), ("--seed", ["-1", "nan"])],
    ),
    "extract": (
        ["extract", LLAMA_BASE, TUNED, "-o", "{out}"],
        [("--rank", ["0", "inf"]), ("--fro", [*NON_FINITE, "0", "1.5"])],
    ),
    "extract-more": (
        ["extract", LLAMA_BASE, TUNED, "--rank", "2", "-o", "{out}"],
        [("--max-rank", ["0"]), ("--threshold", ["0", "nan"]), ("--min-delta", [*NON_FINITE, "-1"])],
    ),
    "export-onnx": (
        ["export-onnx", LLAMA_BASE, "--adapter", LLAMA_LORA, "-o", "{out}"],
        [("--weights", NON_FINITE), ("--opset", ["0", "nan"])],
    ),
    "bench": (
        ["bench", LLAMA_BASE],
        [("--batch", ["0", "nan"]), ("--seq", ["-3", "inf"]), ("--repeats", ["0"]), ("--warmup", ["-1"])],
    ),
}


def _params() -> list:
    return [
        pytest.param(name, option, value, id=f"{name}{option}={value}")
        for name, (_, options) in CASES.items()
        for option, values in options
        for value in values
    ]


@pytest.mark.parametrize(("name", "option", "value"), _params())
def test_a_bad_number_is_a_usage_error(tmp_path: Path, name: str, option: str, value: str) -> None:
    argv, _ = CASES[name]
    argv = [str(a).replace("{out}", str(tmp_path / "out")) for a in argv]
    code, out, err = invoke(*argv, option, value)
    assert_one_line_error(code, out, err, option)
    assert "Invalid value" in err and "internal error" not in err, err
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_merge_nan_weight_with_verify_fails(tmp_path: Path) -> None:
    """The issue's first report: it exited 0 '(verified)' with a wrong update."""
    code, out, err = invoke("merge", LLAMA_BASE, LLAMA_LORA, "-o", tmp_path / "m", "--weights", "nan", "--verify")
    assert code == 2 and "(verified)" not in out
    assert not (tmp_path / "m").exists()


def test_good_numbers_still_pass(tmp_path: Path) -> None:
    """The checks refuse only what is wrong: negative weights, small fractions, 1 as a ratio are fine."""
    code, _, err = invoke("rescale", LLAMA_LORA, "--scale", "-0.5", "-o", tmp_path / "r")
    assert code == 0, err
    code, _, err = invoke("resize", LLAMA_LORA, "--ratio", "1", "-o", tmp_path / "s")
    assert code == 0, err
    code, _, err = invoke("combine", LLAMA_LORA, LLAMA_LORA, "--weights", "1,-1e-3", "-o", tmp_path / "c")
    assert code == 0, err


def _library_calls(tmp: Path) -> list:
    from loratools import combine, extract, merge, rescale, resize, verify
    from loratools.onnx.bench import bench
    from loratools.onnx.export import export_onnx
    from loratools.onnx.patch import merge_onnx

    nan, inf = math.nan, math.inf
    out = tmp / "out"
    return [
        ("weights", lambda: merge(LLAMA_BASE, [LLAMA_LORA], out, weights=[nan])),
        ("weights", lambda: merge(LLAMA_BASE, [LLAMA_LORA], out, weights=[1e39])),
        ("weights", lambda: verify(LLAMA_BASE, LLAMA_BASE, [LLAMA_LORA], weights=[inf])),
        ("weights", lambda: combine([LLAMA_LORA, LLAMA_LORA], weights=[1.0, nan])),
        ("density", lambda: combine([LLAMA_LORA, LLAMA_LORA], method="ties", density=nan)),
        ("seed", lambda: combine([LLAMA_LORA], method="dare_linear", density=0.5, seed=-1)),
        ("scale", lambda: rescale(LLAMA_LORA, scale=nan)),
        ("scale", lambda: rescale(LLAMA_LORA, scale=-inf)),
        ("alpha", lambda: rescale(LLAMA_LORA, alpha=inf)),
        ("ratio", lambda: resize(LLAMA_LORA, ratio=nan)),
        ("fro", lambda: resize(LLAMA_LORA, fro=nan)),
        ("cumulative", lambda: resize(LLAMA_LORA, cumulative=inf)),
        ("budget", lambda: resize(LLAMA_LORA, budget=inf)),  # type: ignore[arg-type]
        ("max-rank", lambda: resize(LLAMA_LORA, rank=2, max_rank=0)),
        ("fro", lambda: extract(LLAMA_BASE, TUNED, fro=nan)),
        ("min-delta", lambda: extract(LLAMA_BASE, TUNED, rank=2, min_delta=nan)),
        ("threshold", lambda: extract(LLAMA_BASE, TUNED, rank=2, threshold=0)),
        ("weights", lambda: export_onnx(LLAMA_BASE, out, adapters=[LLAMA_LORA], weights=[nan])),
        ("opset", lambda: export_onnx(LLAMA_BASE, out, opset=0)),
        ("weights", lambda: merge_onnx(tmp, [LLAMA_LORA], out, weights=[inf])),
        ("repeats", lambda: bench(LLAMA_BASE, repeats=0)),
        ("warmup", lambda: bench(LLAMA_BASE, warmup=-1)),
    ]


def test_the_library_refuses_the_same_numbers(tmp_path: Path) -> None:
    """The API checks its arguments with the same helper the CLI's parameter type uses."""
    for name, call in _library_calls(tmp_path):
        with pytest.raises(UsageError) as exc:
            call()
        assert name in str(exc.value), (name, str(exc.value))
    assert list(tmp_path.iterdir()) == []


def test_every_numeric_option_uses_the_one_check() -> None:
    """A new int/float option that bypasses cli.options.Number would accept nan, inf or 0 again."""
    import click

    from loratools.cli.main import COMMANDS, cli
    from loratools.cli.options import Number, WeightList

    ctx = click.Context(cli)
    plain = []
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        for p in command.params:
            if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType)) and not isinstance(
                p.type, Number
            ):
                plain.append(f"{name} {p.opts[0]}")
            if p.name == "weights":
                assert isinstance(p.type, WeightList), f"{name} --weights"
    assert plain == [], f"numeric options without cli.options.Number: {plain}"
