"""A GGUF diffusion checkpoint as the base of validate / info / convert (issue 21): read like the safetensors single
file holding the same tensors, so every finding and byte equals that file's; a GGUF file without
general.architecture (stable-diffusion.cpp) is a diffusion base when its names are a DiT family's, else the
llama.cpp refusal stays."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from dit_support import kohya_flux, to_bfl
from gguf_dit_support import comfy_state, flux_model, raw_bytes, wan_model, write_comfy_gguf
from safetensors.torch import load_file, save_file
from wan_qwen_support import WAN

from loratools import merge
from loratools.cli.main import cli
from loratools.formats.adapter_io import gguf_base_kind


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """flux.gguf (Q8_0/F16/F32), the same tensors dequantized as a BFL single file, a kohya LoRA, a LoRA with one
    lora_up three rows short, a Wan LoRA."""
    d = tmp_path_factory.mktemp("dit_gguf_base")
    model = flux_model()
    base = d / "flux-Q8_0.gguf"
    write_comfy_gguf(to_bfl(model.state_dict()), base, "flux", "Q8_0")
    single = d / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in comfy_state(base)[0].items()}, str(single))
    lora = kohya_flux(model)
    save_file(lora, str(d / "lora.safetensors"))
    bad = dict(lora)
    key = "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight"
    bad[key] = bad[key][:-3].contiguous()
    save_file(bad, str(d / "bad.safetensors"))
    save_file(WAN.lora(wan_model(), "kohya"), str(d / "wan.safetensors"))
    return d, base, single


def _validate(adapter: Path, base: Path) -> dict:
    r = CliRunner().invoke(cli, ["validate", str(adapter), "--base", str(base), "--json"])
    assert "Traceback" not in r.output and "maps yet" not in r.output, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("lora", ["lora", "bad", "wan"])
def test_validate_reports_what_the_single_file_reports(files, lora):
    d, base, single = files
    ours, theirs = _validate(d / f"{lora}.safetensors", base), _validate(d / f"{lora}.safetensors", single)
    strip = [(f["code"], f.get("module"), f["message"].replace(base.name, "B").replace(single.name, "B"))
             for f in ours["findings"]]  # fmt: skip
    assert strip == [(f["code"], f.get("module"), f["message"].replace(single.name, "B")) for f in theirs["findings"]]
    assert (ours["errors"], ours["modules_checked"]) == (theirs["errors"], theirs["modules_checked"])
    codes = {f["code"] for f in ours["findings"]}
    if lora == "bad":
        assert "shape_mismatch" in codes and "[256, 64]" in str(ours["findings"])
    if lora == "wan":
        assert "a Flux checkpoint" in str(ours["findings"]) and "Wan" in str(ours["findings"])


def test_info_and_convert_with_a_gguf_base(files):
    d, base, single = files
    runner = CliRunner()
    infos = []
    for b in (base, single):
        r = runner.invoke(cli, ["info", str(d / "lora.safetensors"), "--base", str(b), "--json"])
        assert r.exit_code == 0, r.output
        infos.append(json.loads(r.stdout))
    assert infos[0]["base_parameters"] == infos[1]["base_parameters"] > 0 and infos[0]["unresolved"] == []
    outs = []
    for i, b in enumerate((base, single)):
        out = d / f"comfy{i}.safetensors"
        r = runner.invoke(cli, ["convert", str(d / "lora.safetensors"), "--to", "comfyui", "--base", str(b),
                                "-o", str(out), "--overwrite"])  # fmt: skip
        assert r.exit_code == 0, r.output
        outs.append(load_file(str(out)))
    assert outs[0].keys() == outs[1].keys() and all(bool((outs[0][k] == outs[1][k]).all()) for k in outs[0])


def _no_arch(monkeypatch, write) -> None:
    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_architecture", lambda self: None)
        write()


def test_a_file_without_architecture_with_dit_names_is_a_diffusion_base(files, tmp_path, monkeypatch):
    """stable-diffusion.cpp writes no general.architecture: Flux names make it a diffusion base; it merges to the
    flux-architecture file's tensors exactly (non-zero deltas) and states no architecture either."""
    d, base, _ = files
    bare = tmp_path / "sdcpp-flux.gguf"
    _no_arch(monkeypatch, lambda: write_comfy_gguf(comfy_state(base)[0], bare, "flux", "Q8_0"))
    assert "general.architecture" not in gguf.GGUFReader(bare).fields
    assert gguf_base_kind(bare) == "diffusion" and gguf_base_kind(base) == "diffusion"
    assert _validate(d / "bad.safetensors", bare)["errors"] == _validate(d / "bad.safetensors", base)["errors"]
    merge(bare, [d / "lora.safetensors"], tmp_path / "a.gguf")
    merge(base, [d / "lora.safetensors"], tmp_path / "b.gguf")
    a, b, before = raw_bytes(tmp_path / "a.gguf"), raw_bytes(tmp_path / "b.gguf"), raw_bytes(bare)
    assert a == b and sum(a[k] != before[k] for k in a) >= 20
    assert "general.architecture" not in gguf.GGUFReader(tmp_path / "a.gguf").fields


def test_a_file_without_architecture_with_other_names_stays_a_llamacpp_base(files, tmp_path, monkeypatch):
    d, _, _ = files
    llm = tmp_path / "llm.gguf"

    def write() -> None:
        w = gguf.GGUFWriter(llm, "llama")
        w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _no_arch(monkeypatch, write)
    assert gguf_base_kind(llm) == "llama.cpp"
    r = CliRunner().invoke(cli, ["validate", str(d / "lora.safetensors"), "--base", str(llm)])
    assert r.exit_code != 0 and "Traceback" not in r.output and str(llm) in r.output, r.output
