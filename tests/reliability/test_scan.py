"""validate --scan: figures from the factors match dense oracles; a planted update is found and named."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from reliability_support import FIXTURES, LLAMA_LORA, invoke

from loratools.formats.adapter_io import save_adapter
from loratools.model.adapter import Adapter, LoraModule
from loratools.ops.scan import module_figures, scan_adapter

SHAPES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.up_proj": (172, 64),
    "mlp.down_proj": (64, 172),
}
PLANTED = "model.layers.7.self_attn.v_proj"


def realistic(seed: int, layers: int = 12, plant: bool = False) -> Adapter:
    """Random factors over a 12-layer model, update norms growing with depth (as trained adapters do)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(layers):
        for name, (out, inp) in SHAPES.items():
            a = torch.randn(8, inp, generator=g) / inp**0.5
            b = torch.randn(out, 8, generator=g) * 0.02 * (1 + 0.05 * layer)
            modules[f"model.layers.{layer}.{name}"] = LoraModule(down=a, up=b, alpha=16.0)
    if plant:  # a concentrated, rank-one push into a single output row of one module
        m = modules[PLANTED]
        b = m.up.clone()
        b[3] += 0.3 * torch.randn(8, generator=g)
        modules[PLANTED] = m.with_factors(m.down, b)
    return Adapter(modules=modules, meta={"format": "peft"})


def test_figures_match_the_dense_oracle() -> None:
    g = torch.Generator().manual_seed(0)
    m = LoraModule(down=torch.randn(6, 40, generator=g), up=torch.randn(24, 6, generator=g), alpha=3.0)
    fig = module_figures(m)
    dense = m.delta(torch.float64)
    s2 = torch.linalg.svdvals(dense) ** 2
    p = s2 / s2.sum()
    assert fig["fro_norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-9)
    assert fig["stable_rank"] == pytest.approx(float(s2.sum() / s2.max()), rel=1e-7)
    entropy = float(-(p * p.log()).sum()) / math.log(6)
    assert fig["spectral_entropy"] == pytest.approx(entropy, rel=1e-7)
    rows, cols = (dense**2).sum(1), (dense**2).sum(0)
    assert fig["top_row_share"] == pytest.approx(float(rows.max() / rows.sum()), rel=1e-9)
    assert fig["top_col_share"] == pytest.approx(float(cols.max() / cols.sum()), rel=1e-9)
    assert abs(fig["kurtosis"]) < 2  # Gaussian factors: excess kurtosis near 0


def test_the_scan_never_forms_the_dense_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("the scan formed a dense delta")

    monkeypatch.setattr(LoraModule, "delta", forbidden)
    assert scan_adapter(realistic(1, layers=6)).modules


@pytest.mark.parametrize("seed", range(8))
def test_clean_adapters_raise_no_flags(seed: int) -> None:
    report = scan_adapter(realistic(seed))
    assert report.flagged == [] and report.red_flags == []
    assert set(report.families.values()) == {12}


def test_a_planted_update_is_found_and_named(tmp_path: Path) -> None:
    adapter = realistic(3, plant=True)
    report = scan_adapter(adapter)
    assert [m.module for m in report.flagged] == [PLANTED]
    metrics = {f["metric"] for f in report.flagged[0].flags}
    assert {"stable_rank", "top_row_share"} <= metrics

    out = tmp_path / "planted"
    save_adapter(adapter, out)
    code, stdout, stderr = invoke("validate", out, "--scan", "--json")
    assert code == 0, stderr  # a flag asks for review; it is not an error
    data = json.loads(stdout)
    found = [f for f in data["findings"] if f["code"] == "scan_outlier"]
    assert [f["module"] for f in found] == [PLANTED] and found[0]["severity"] == "warning"
    assert "model.layers.*.self_attn.v_proj" in found[0]["message"] and "robust z" in found[0]["message"]
    assert data["scan"]["flagged"] == [PLANTED] and len(data["scan"]["modules"]) == 72
    code, stdout, _ = invoke("validate", out, "--scan")
    assert code == 0 and "scan_outlier" in stdout and PLANTED in stdout


def test_structural_red_flags(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(LLAMA_LORA, folder)
    (folder / "helper.pkl").write_bytes(b"\x80\x04N.")
    script = folder / "install.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    report = scan_adapter(folder)
    foreign = sorted(f["message"].split(":")[0] for f in report.red_flags if f["code"] == "scan_foreign_file")
    assert foreign == [str(folder / "helper.pkl"), str(folder / "install.sh")]

    full = scan_adapter(FIXTURES / "peft" / "llama-mts")
    assert [f["module"] for f in full.red_flags if f["code"] == "scan_full_matrix"] == ["lm_head"]

    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "r": 6}))
    declared = [f for f in scan_adapter(folder).red_flags if f["code"] == "scan_rank_declared"]
    assert len(declared) == 8 and "declared rank 6, tensor rank 4" in declared[0]["message"]
    code, stdout, _ = invoke("validate", folder, "--scan", "--json")
    codes = [f["code"] for f in json.loads(stdout)["findings"]]
    assert code == 1 and codes.count("config_rank") == 8 and "scan_rank_declared" not in codes  # not twice
    assert codes.count("scan_foreign_file") == 2


def test_scan_skips_modules_it_cannot_measure() -> None:
    adapter = realistic(2, layers=6)
    name = "model.layers.2.mlp.up_proj"
    m = adapter.modules[name]
    bad = m.up.clone()
    bad[0, 0] = float("nan")
    adapter.modules[name] = m.with_factors(m.down, bad)
    report = scan_adapter(adapter)
    assert report.skipped == [name] and len(report.modules) == 35
