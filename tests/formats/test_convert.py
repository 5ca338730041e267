"""convert: PEFT and diffusers load our outputs and compute what the math says; round trips are exact."""

from __future__ import annotations

import copy

import pytest
import torch
from formats_support import FIXTURES, component_weights, fused_weights, run_cli
from safetensors.torch import load_file

from loratools import convert
from loratools.formats.adapter_io import load_adapter


def _merged_copy(model: torch.nn.Module, adapter, prefix: str = "") -> torch.nn.Module:
    """``model`` with every ΔW added to its weight: what any correct loader must compute."""
    merged = copy.deepcopy(model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for name, m in adapter.modules.items():
            params[f"{name.removeprefix(prefix)}.weight"] += m.delta()
    return merged


def _assert_changes(base_out: torch.Tensor, out: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert (expected - base_out).abs().max() > 100 * atol  # the adapter matters far beyond the tolerance
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-4)


def test_kohya_to_peft_text_encoder_loads_in_peft(pipe, sd_dir, kohya_mixed, work):
    from peft import PeftModel

    out = work / "te-peft"
    result = convert(kohya_mixed, "peft", out, base=sd_dir / "text_encoder", exclude="^lora_unet_")
    assert result.modules == 4 and result.format == "peft"
    adapter = load_adapter(out)
    te = pipe.text_encoder
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_out = te(input_ids=ids).last_hidden_state
        expected = _merged_copy(te, adapter)(input_ids=ids).last_hidden_state
        peft_model = PeftModel.from_pretrained(copy.deepcopy(te), str(out)).eval()
        got = peft_model(input_ids=ids).last_hidden_state
    _assert_changes(base_out, got, expected, atol=1e-5)


def test_kohya_to_peft_unet_loads_in_peft(pipe, sd_dir, kohya_mixed, work):
    from peft import PeftModel

    out = work / "unet-peft"
    convert(kohya_mixed, "peft", out, base=sd_dir / "unet", exclude="^lora_te_")
    adapter = load_adapter(out)
    assert {m.kind for m in adapter.modules.values()} == {"linear", "conv"}
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 32, generator=g)
    unet = pipe.unet
    with torch.no_grad():
        base_out = unet(sample, 10, encoder_hidden_states=ctx).sample
        expected = _merged_copy(unet, adapter)(sample, 10, encoder_hidden_states=ctx).sample
        peft_model = PeftModel.from_pretrained(copy.deepcopy(unet), str(out)).eval()
        got = peft_model(sample, 10, encoder_hidden_states=ctx).sample
    _assert_changes(base_out, got, expected, atol=1e-4)


def test_pipeline_lora_to_peft_is_one_adapter_per_component(pipe, sd_dir, kohya_mixed, work):
    """PEFT adapts one model: a pipeline LoRA becomes OUT/unet/ and OUT/text_encoder/, each loading into its
    own model with every module applied (one adapter spanning both loaded with nothing applied, issue 14 #18)."""
    from peft import PeftModel

    out = work / "pipe-peft"
    convert(kohya_mixed, "peft", out, base=sd_dir)
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "unet"]
    source = load_adapter(kohya_mixed, base=sd_dir)
    for component in ("unet", "text_encoder"):
        part = load_adapter(out / component)
        mine = {k.removeprefix(component + "."): m for k, m in source.modules.items() if k.startswith(component + ".")}
        assert part.modules.keys() == mine.keys()
        for name, m in part.modules.items():
            assert torch.equal(m.delta(), mine[name].delta()), name
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    te = pipe.text_encoder
    with torch.no_grad():
        base_out = te(input_ids=ids).last_hidden_state
        expected = _merged_copy(te, load_adapter(out / "text_encoder"))(input_ids=ids).last_hidden_state
        got = PeftModel.from_pretrained(copy.deepcopy(te), str(out / "text_encoder")).eval()(input_ids=ids)
    _assert_changes(base_out, got.last_hidden_state, expected, atol=1e-5)


def test_kohya_peft_kohya_round_trip_is_exact(sd_dir, kohya_mixed, work):
    convert(kohya_mixed, "peft", work / "rt-peft", base=sd_dir / "text_encoder", exclude="^lora_unet_")
    back = work / "rt.safetensors"
    convert(work / "rt-peft", "kohya", back, kohya_prefix="lora_te_")
    a, b = load_file(str(kohya_mixed)), load_file(str(back))
    a = {k: v for k, v in a.items() if k.startswith("lora_te_")}
    assert a.keys() == b.keys()  # the same kohya names
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k


def test_kohya_to_diffusers_keeps_every_alpha(pipe, sd_dir, kohya_mixed, work):
    """diffusers' loader gets the per-module alphas right from our file (unlike from the kohya file itself)."""
    out = work / "k2d"
    convert(kohya_mixed, "diffusers", out, base=sd_dir)
    adapter = load_adapter(kohya_mixed, base=sd_dir)
    before = component_weights(pipe)
    after = fused_weights(pipe, out)
    for name, m in adapter.modules.items():
        observed = after[f"{name}.weight"] - before[f"{name}.weight"]
        torch.testing.assert_close(observed, m.delta(), atol=2e-6, rtol=1e-5, msg=name)


def test_diffusers_peft_diffusers_round_trip(pipe, diffusers_lora, work):
    original = load_adapter(diffusers_lora)
    assert original.format == "diffusers" and len(original.alphas()) > 1 and len(original.ranks()) > 1
    convert(diffusers_lora, "peft", work / "d-peft")
    convert(work / "d-peft", "diffusers", work / "d-back")
    back = load_adapter(work / "d-back")
    assert back.modules.keys() == original.modules.keys()
    for name, m in original.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), atol=0, rtol=1e-7)
    # and diffusers itself reads both files the same way
    a, b = fused_weights(pipe, diffusers_lora), fused_weights(pipe, work / "d-back")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=0)


def test_diffusers_to_kohya_and_back(diffusers_lora, sd_dir, work):
    convert(diffusers_lora, "kohya", work / "d.safetensors")
    back = load_adapter(work / "d.safetensors", base=sd_dir)
    original = load_adapter(diffusers_lora)
    assert back.modules.keys() == original.modules.keys()
    for name, m in original.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), atol=0, rtol=1e-7)


def test_llm_adapter_to_kohya_with_prefix_round_trips(work):
    src = FIXTURES / "peft" / "llama-patterns"
    out = work / "llama.safetensors"
    convert(src, "kohya", out, kohya_prefix="lora_te_")
    base = FIXTURES / "bases" / "llama"
    back = load_adapter(out, base=base)
    original = load_adapter(src, base=base)
    assert back.modules.keys() == original.modules.keys()
    for name, m in original.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), atol=1e-7, rtol=1e-6)


def test_rslora_folds_into_kohya_alpha(work):
    src = FIXTURES / "peft" / "llama-rslora"
    result = convert(src, "kohya", work / "rs.safetensors", kohya_prefix="lora_te")
    assert result.folded_alpha
    back = load_adapter(work / "rs.safetensors", base=FIXTURES / "bases" / "llama")
    original = load_adapter(src, base=FIXTURES / "bases" / "llama")
    for name, m in original.modules.items():
        assert m.use_rslora and not back.modules[name].use_rslora
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), atol=1e-7, rtol=1e-6)


def _one_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], err
    assert "Traceback" not in err


def test_cli_refuses_llm_adapter_to_kohya_without_prefix(work):
    code, _, err = run_cli(
        ["convert", str(FIXTURES / "peft" / "llama-lora"), "--to", "kohya", "-o", str(work / "x.st")]
    )
    _one_error(code, err, "no kohya prefix", "model.layers.0")
    assert "--kohya-prefix" in err
    assert not (work / "x.st").exists()


@pytest.mark.parametrize(("fixture", "needle"), [("llama-embed", "embedding"), ("llama-mts", "modules_to_save")])
def test_cli_refuses_what_kohya_cannot_hold(work, fixture, needle):
    out = work / f"{fixture}.safetensors"
    args = ["convert", str(FIXTURES / "peft" / fixture), "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", str(out)]
    code, _, err = run_cli(args)
    _one_error(code, err, needle)
    assert not out.exists()


def test_cli_refuses_kohya_names_without_base(kohya_mixed, work):
    code, _, err = run_cli(["convert", str(kohya_mixed), "--to", "peft", "-o", str(work / "nobase")])
    _one_error(code, err, "kohya names")
    assert "--base" in err


def test_cli_refuses_loha_and_flux(work):
    from safetensors.torch import save_file

    for name, key in (
        ("loha", "lora_unet_x_y.hada_w1_a"),
        ("flux", "lora_unet_single_blocks_0_linear1.lora_down.weight"),
    ):
        path = work / f"cli-{name}.safetensors"
        save_file({key: torch.ones(2, 2)}, str(path))
        code, _, err = run_cli(["convert", str(path), "--to", "peft", "-o", str(work / f"cli-{name}-out")])
        _one_error(code, err, "LoHa" if name == "loha" else "Flux")


def test_cli_refuses_option_the_format_does_not_take(kohya_mixed, work):
    code, _, err = run_cli(["convert", str(kohya_mixed), "--to", "kohya", "--dtype", "fp16", "-o", str(work / "d.st")])
    _one_error(code, err, "dtype")


def test_cli_convert_json_and_registry_choices(kohya_mixed, sd_dir, work):
    import json

    from loratools.formats.registry import _REGISTRY, AdapterFormat, register_format

    code, out, err = run_cli(
        ["convert", str(kohya_mixed), "--to", "diffusers", "--base", str(sd_dir), "-o", str(work / "cli-d"), "--json"]
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["format"] == "diffusers" and data["modules"] == 18 and data["source_format"] == "kohya"

    @register_format
    class Dummy(AdapterFormat):
        name = "dummy-format"

    try:
        _, help_text, _ = run_cli(["convert", "--help"])
        assert "dummy-format" in help_text and "kohya" in help_text
    finally:
        _REGISTRY.pop("dummy-format")


def test_legacy_diffusers_forms_from_diffusers_conversion(sd_dir_text_model, kohya_mixed, work):
    """diffusers' own kohya conversion writes the older forms (processor.to_q_lora, lora_linear_layer,
    .lora.down) and ``.alpha`` keys; reading them gives the deltas of the kohya file itself."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import save_file

    converted, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(kohya_mixed)))
    assert any(".processor.to_k_lora." in k for k in converted)
    assert any(".lora_linear_layer." in k for k in converted) and any(".lora.down." in k for k in converted)
    tensors = {**converted, **{k: torch.tensor(v) for k, v in alphas.items()}}
    path = work / "legacy.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    legacy = load_adapter(path)
    assert legacy.format == "diffusers"
    expected = load_adapter(kohya_mixed, base=sd_dir_text_model)
    assert legacy.modules.keys() == expected.modules.keys()
    for name, m in expected.modules.items():
        torch.testing.assert_close(legacy.modules[name].delta(), m.delta(), atol=0, rtol=1e-7, msg=name)


def test_written_weights_are_as_readable_as_other_new_files(diffusers_lora, work):
    """safetensors 0.8 creates its files 0600; ours get what the umask gives any new file (0644 under 022)."""
    import stat

    probe = work / "mode-probe.txt"
    probe.write_text("")
    want = stat.S_IMODE(probe.stat().st_mode)
    outputs = {
        "peft": (FIXTURES / "peft" / "llama-lora", work / "mode-peft", "adapter_model.safetensors", {}),
        "kohya": (FIXTURES / "peft" / "llama-lora", work / "mode.safetensors", "", {"kohya_prefix": "lora_te_"}),
        "diffusers": (diffusers_lora, work / "mode-diffusers", "pytorch_lora_weights.safetensors", {}),
    }
    for to, (src, out, name, options) in outputs.items():
        convert(src, to, out, **options)
        written = out / name if name else out
        assert stat.S_IMODE(written.stat().st_mode) == want, (to, oct(written.stat().st_mode))


@pytest.mark.parametrize("command", [["resize", "--rank", "2"], ["rescale", "--scale", "2"]])
def test_every_writer_refuses_kohya_names_for_peft(kohya_mixed, work, command):
    """resize/rescale --to peft used to write kohya underscore names as PEFT targets (issue 14 #18)."""
    out = work / f"kohya-names-{command[0]}"
    code, _, err = run_cli([command[0], str(kohya_mixed), *command[1:], "--to", "peft", "-o", str(out)])
    _one_error(code, err, "still have kohya names, which peft cannot hold", "lora_te_text_model_encoder")
    assert not out.exists()
