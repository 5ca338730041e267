"""bench: every variant is timed and the JSON is complete."""

from __future__ import annotations

import json

from onnx_support import run_cli


def test_bench_cli_json(tiny, tmp_path):
    t = tiny("llama")
    args = ["bench", t.base, "--adapter", t.adapter, "--seq", 8, "--repeats", 2, "--warmup", 1, "--json"]
    code, out, err = run_cli([*args, "--work-dir", tmp_path / "w"])
    assert code == 0, err
    data = json.loads(out)
    variants = [r["variant"] for r in data["rows"]]
    assert variants == [
        "base onnx",
        "merged onnx",
        "slots onnx + adapter",
        "pytorch eager unmerged (peft)",
        "pytorch eager merged",
    ]
    for row in data["rows"]:
        assert row["p50_ms"] > 0 and row["p90_ms"] >= row["p50_ms"] and row["runs"] == 2
    assert data["merge_onnx_seconds"] > 0 and data["export_seconds"] > 0  # which is faster: a benchmark's question
    assert next(r for r in data["rows"] if r["variant"] == "merged onnx")["vs_merged"] == 1.0
