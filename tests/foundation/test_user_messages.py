"""Messages a user meets (issue 19.4): each one line that names the thing and says what to do.

Read-only and full file systems are real ones: a tmpfs of 64 KiB and a read-only bind mount made in a
private user and mount namespace (``unshare``; root ignores chmod, so a chmod'd folder would not do).
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from foundation_support import ROOT, adapter_dir, base_dir

from loratools.errors import DiskSpaceError, OutputWriteError
from loratools.publishing.write_errors import describe

GGUF_BASE = ROOT / "fixtures" / "gguf" / "llama-f32.gguf"  # 90 KB: a merged copy cannot fit in 64 KiB


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_work(), reason="unshare of user+mount namespaces refused")


def _in_small_mounts(mnt: Path, *commands: list) -> list[subprocess.CompletedProcess]:
    """Run loratools commands with ``mnt`` a 64 KiB tmpfs and ``mnt/ro`` a read-only bind of a folder in it.

    One namespace for all commands; each prints its exit status and streams between markers."""
    mnt.mkdir()
    lines = [f"mount -t tmpfs -o size=64k tmpfs {mnt}", f"mkdir {mnt}/ro", f"mount --bind -o ro {mnt}/ro {mnt}/ro"]
    for i, args in enumerate(commands):
        cmd = shlex.join([sys.executable, "-m", "loratools", *map(str, args)])
        lines.append(f"{cmd} >{mnt}.out{i} 2>{mnt}.err{i}; echo $? >{mnt}.rc{i}")
    lines.append(f"ls -A {mnt} {mnt}/ro > {mnt}.ls")
    script = " && ".join(lines[:3]) + "; " + "; ".join(lines[3:])
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0
    results = []
    for i, args in enumerate(commands):
        rc = int(Path(f"{mnt}.rc{i}").read_text())
        out, err = Path(f"{mnt}.out{i}").read_text(), Path(f"{mnt}.err{i}").read_text()
        results.append(subprocess.CompletedProcess(args, rc, out, err))
    return results


def _one_line(result: subprocess.CompletedProcess) -> tuple[str, str]:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: "), result.stderr
    assert "Traceback" not in result.stderr and "OSError" not in result.stderr
    assert "loratools-tmp" not in result.stderr  # the user named -o OUT, not our temporary
    return lines[0], lines[1]


@needs_namespaces
def test_read_only_and_full_file_systems(tmp_path) -> None:
    mnt = tmp_path / "mnt"
    lora = adapter_dir("llama-lora")
    full, ro_file, ro_nested, ro_folder, ro_json = _in_small_mounts(
        mnt,
        ["merge", GGUF_BASE, lora, "-o", mnt / "merged.gguf"],  # no space estimate on this path: it fills up
        ["convert", lora, "--to", "kohya", "-o", mnt / "ro" / "k.safetensors"],
        ["convert", lora, "--to", "kohya", "-o", mnt / "ro" / "new" / "k.safetensors"],
        ["rescale", lora, "--scale", "2", "-o", mnt / "ro" / "half"],  # refused before the space check
        ["merge", base_dir("llama"), lora, "-o", mnt / "ro" / "m", "--json"],
    )
    error, hint = _one_line(full)
    assert error.startswith(f"Error: {mnt / 'merged.gguf'}: the disk filled up while writing the output")
    assert "nothing was published" in error and "free some space" in hint
    for result, out in ((ro_file, "k.safetensors"), (ro_nested, "new/k.safetensors"), (ro_folder, "half")):
        error, hint = _one_line(result)
        assert error == (
            f"Error: {mnt / 'ro' / out}: cannot write the output: {mnt / 'ro'} is on a read-only file system; "
            "nothing was published"
        )
        assert "writable folder" in hint
    import json

    assert json.loads(ro_json.stdout)["error"]["type"] == "OutputWriteError" and ro_json.returncode == 2
    assert (tmp_path / "mnt.ls").read_text().split() == [f"{mnt}:", "ro", f"{mnt}/ro:"]  # nothing left behind


def test_mapping_of_real_os_errors(tmp_path) -> None:
    """Without namespaces too: OS errors the kernel really raised, mapped for the output they concern."""
    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb") as f:  # every write there fails with ENOSPC
            f.write(b"x")
            f.flush()
    assert full.value.errno == errno.ENOSPC
    mapped = describe(full.value, tmp_path / "out")
    assert isinstance(mapped, DiskSpaceError) and mapped.message.startswith(f"{tmp_path / 'out'}: the disk filled")
    target = Path("/sys/kernel/loratools-out.safetensors")
    with pytest.raises(OSError) as sysfs:
        open(target, "wb")  # sysfs takes no new files, also not from root (EACCES, or EROFS where mounted ro)
    mapped = describe(sysfs.value, target)
    assert isinstance(mapped, OutputWriteError) and mapped.errno == sysfs.value.errno
    assert mapped.message.startswith(f"{target}: cannot write the output: ")
    unrelated = OSError(errno.EACCES, "Permission denied", str(tmp_path / "some-input"))
    assert describe(unrelated, tmp_path / "out") is None  # an input's error stays about the input


FAMILIES = ROOT / "fixtures" / "families"


def test_info_lycoris_conv_kind_comes_from_the_base() -> None:
    """lycoris-lora's own writer over a UNet whose proj_in/proj_out are convs: the file stores the conv LoHa
    factors flattened, so only the base tells conv from linear; info must not claim `linear in 72`."""
    from lycoris_family_models import tiny_unet
    from models import run_cli
    from torch import nn

    from loratools.ops.info import info

    path = FAMILIES / "lycoris-loha.safetensors"
    alone = info(path)
    assert {m["kind"] for m in alone["modules"]} == {None} and alone["kinds"] == []
    assert any("linear or conv is not known without --base" in n for n in alone["notes"])
    code, human, _ = run_cli(["info", path])
    assert code == 0 and "modules            10 (?)" in human
    assert "lycoris_down_blocks_0_proj_in   ?     2" in human and "lycoris_down_blocks_0_to_q      ?" in human

    with_base = info(path, base=FAMILIES / "tiny-unet")
    layers = dict(tiny_unet().named_modules())
    for m in with_base["modules"]:
        layer = layers[m["name"]]
        if isinstance(layer, nn.Conv2d):
            assert m["kind"] == "conv" and m["in_channels"] == layer.in_channels
            assert m["kernel_size"] == list(layer.kernel_size)
            assert m["in_features"] == layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            assert isinstance(layer, nn.Linear) and m["kind"] == "linear"
    assert with_base["kinds"] == ["conv", "linear"] and with_base["notes"] == []
    code, human, _ = run_cli(["info", path, "--base", FAMILIES / "tiny-unet"])
    assert "down_blocks.0.proj_in   conv 3x3" in human and "down_blocks.0.proj_out  conv 1x1" in human

    # every kind info does claim without a base is the layer's (Tucker convs and full lokr_w2 keep 4-D tensors)
    by_kohya = {"lycoris_" + n.replace(".", "_"): layer for n, layer in layers.items()}
    claimed = 0
    for name in ("lycoris-loha-tucker", "lycoris-lokr", "lycoris-lokr-full", "lycoris-loha-dora"):
        for m in info(FAMILIES / f"{name}.safetensors")["modules"]:
            layer = by_kohya[m["name"]]
            if m["kind"] is not None:
                claimed += 1
                assert m["kind"] == ("conv" if isinstance(layer, nn.Conv2d) else "linear"), (name, m["name"])
    assert claimed >= 8


def _kohya_file(path: Path, names: list[str], alpha: dict[str, float]) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for n in names:
        tensors[f"{n}.lora_down.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"{n}.lora_up.weight"] = torch.randn(32, 4, generator=g)
        if n in alpha:
            tensors[f"{n}.alpha"] = torch.tensor(alpha[n])
    save_file(tensors, str(path))
    return path


def test_info_targets_are_no_raw_kohya_names(tmp_path) -> None:
    from loratools.ops.info import info

    names = [
        "lora_unet_conv_in",
        "lora_unet_time_embedding_linear_1",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lycoris_down_blocks_1_ff",
    ]
    d = info(_kohya_file(tmp_path / "sd.safetensors", names, {n: 2.0 for n in names}))
    assert d["target_modules"] == ["attn1_to_q", "conv_in", "ff", "self_attn_q_proj", "time_embedding_linear_1"]
    assert d["alpha_assumed"] == [] and d["notes"] == []


def test_info_says_when_alpha_is_assumed(tmp_path) -> None:
    """An alpha-less file reads as alpha = rank (kohya's and diffusers' rule): info says it assumed that."""
    import torch
    from models import run_cli
    from safetensors.torch import save_file

    from loratools.ops.info import info

    g = torch.Generator().manual_seed(1)
    mods = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in"]
    tensors = {}
    for m in mods:
        tensors[f"unet.{m}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"unet.{m}.lora_B.weight"] = torch.randn(32, 4, generator=g)
    save_file(tensors, str(tmp_path / "diffusers.safetensors"))
    d = info(tmp_path / "diffusers.safetensors")
    assert d["format"] == "diffusers" and (d["alpha"], d["scale"]) == (4, 1.0)
    assert d["alpha_assumed"] == sorted(f"unet.{m}" for m in mods)
    assert d["notes"] == ["alpha assumed: no module stores an alpha; diffusers takes alpha = rank (scale 1), as shown"]
    code, human, _ = run_cli(["info", tmp_path / "diffusers.safetensors"])
    assert code == 0 and "alpha         4 (assumed: the file stores none)" in human
    assert "note          alpha assumed" in human

    tensors[f"unet.{mods[0]}.alpha"] = torch.tensor(2.0)  # one stored alpha: the other is still assumed
    save_file(tensors, str(tmp_path / "one-alpha.safetensors"))
    d = info(tmp_path / "one-alpha.safetensors")
    assert d["alpha_assumed"] == [f"unet.{mods[1]}"] and "1 of 2 modules store none" in d["notes"][0]

    kohya = _kohya_file(tmp_path / "k.safetensors", ["lora_unet_conv_in", "lora_unet_conv_out"], {})
    assert info(kohya)["notes"][0].startswith("alpha assumed: no module stores an alpha; kohya takes")


@pytest.fixture(scope="module")
def olmo(tmp_path_factory) -> dict[str, Path]:
    """A tiny OLMo (an architecture loratools has no GGUF mapping for; Phi-3 has one since issue 22) and two
    PEFT adapters of it, written by PEFT: one as PEFT
    writes it (auto_mapping: OlmoForCausalLM), one on the saved folder loaded back with auto_mapping null, as
    many published configs have it (then only base_model_name_or_path, the folder, says what the base is)."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import OlmoConfig, OlmoForCausalLM

    root = tmp_path_factory.mktemp("olmo")
    torch.manual_seed(0)
    cfg = OlmoConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        tie_word_embeddings=False,
    )  # fmt: skip
    targets = ["q_proj", "o_proj", "up_proj", "down_proj"]
    OlmoForCausalLM(cfg).eval().save_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(OlmoForCausalLM(cfg).eval(), lora).save_pretrained(root / "by-class")
    loaded = OlmoForCausalLM.from_pretrained(root / "base").eval()
    get_peft_model(loaded, lora).save_pretrained(root / "by-path")
    config = json.loads((root / "by-path" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(root / "base")
    config["auto_mapping"] = None
    (root / "by-path" / "adapter_config.json").write_text(json.dumps(config))
    return {"root": root, "base": root / "base", "by-class": root / "by-class", "by-path": root / "by-path"}


@pytest.mark.parametrize("target", ["llama.cpp", "ollama"])
def test_validate_gguf_targets_refuse_what_convert_refuses(olmo, target: str) -> None:
    """validate --target llama.cpp/ollama on an OLMo adapter says what convert --to gguf then says: no GGUF
    mapping. Once (not once per rule), and no hint suggests the convert command that fails."""
    import json

    from models import run_cli

    out = olmo["root"] / "a.gguf"
    code, _, err = run_cli(["convert", olmo["by-class"], "--to", "gguf", "--base", olmo["base"], "-o", out])
    assert code == 2 and "'OlmoForCausalLM' has no GGUF adapter mapping" in err  # the refusal validate must foresee
    for adapter in ("by-class", "by-path"):
        for base in ([], ["--base", olmo["base"]]):
            code, out, err = run_cli(["validate", olmo[adapter], "--target", target, *base, "--json"])
            report = json.loads(out)
            assert code == 1 and not report["ok"], (adapter, base, out)
            errors = [f for f in report["findings"] if f["severity"] == "error"]
            arch = [f for f in errors if "Olmo" in f["message"] or "olmo" in f["message"]]
            assert len(arch) == 1, (adapter, base, errors)  # one finding for the one problem
            assert all("--to gguf" not in (f["hint"] or "") for f in report["findings"]), report["findings"]
            if target == "ollama":  # Ollama's own importer takes llama and gemma2 only
                assert any(f["code"] == "ollama.importer_arch" for f in errors)
                assert not any(f["code"] == "ollama.prebuilt" for f in report["findings"])
            code, human, _ = run_cli(["validate", olmo[adapter], "--target", target, *base])
            assert human.count("has no GGUF adapter mapping") == 1 and "--to gguf" not in human


def test_validate_gguf_targets_unchanged_for_a_mapped_model() -> None:
    """A Llama adapter still gets the pre-built GGUF advice (the hint that works for it)."""
    import json

    from models import run_cli

    code, out, _ = run_cli(["validate", adapter_dir("llama-lora"), "--target", "ollama", "--json"])
    report = json.loads(out)
    prebuilt = [f for f in report["findings"] if f["code"] == "ollama.prebuilt"]
    assert code == 0 and len(prebuilt) == 1 and "--to gguf" in prebuilt[0]["hint"]
    code, out, _ = run_cli(
        ["validate", adapter_dir("llama-lora"), "--target", "llama.cpp", "--base", base_dir("llama"), "--json"]
    )
    assert code == 0 and json.loads(out)["ok"]


def _peft_wrapped(folder: Path, kind: str) -> set[str]:
    """The modules PEFT itself wraps when it loads ``folder`` onto the fixture base (the oracle)."""
    from foundation_support import load_base
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_base(kind), str(folder))
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("fixture,kind", [("llama-lora", "llama"), ("bert-lora", "bert"), ("gpt2-lora", "gpt2")])
def test_writers_keep_the_users_target_modules(tmp_path, fixture: str, kind: str) -> None:
    """rescale (and resize, convert --to peft, combine of same-module adapters) keep the adapter's own
    target_modules when the module set is unchanged, so diff shows no config change; PEFT wraps the same
    modules. A changed set (convert --exclude) is written as exact module paths."""
    import json

    from models import run_cli

    src = adapter_dir(fixture)
    own = json.loads((src / "adapter_config.json").read_text())["target_modules"]
    wrapped = _peft_wrapped(src, kind)
    runs = {
        "rescale": ["rescale", src, "--scale", "0.5"],
        "resize": ["resize", src, "--rank", "2"],
        "convert": ["convert", src, "--to", "peft"],
        "combine": ["combine", src, src, "--weights", "0.5,0.25"],
    }
    for name, args in runs.items():
        code, _, err = run_cli([*args, "-o", tmp_path / name, "-q"])
        assert code == 0, (name, err)
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["target_modules"] == own, name
        assert _peft_wrapped(tmp_path / name, kind) == wrapped, name
    code, out, _ = run_cli(["diff", src, tmp_path / "rescale", "--json"])
    assert code == 0 and "target_modules" not in json.loads(out)["config"]
    code, human, _ = run_cli(["diff", src, tmp_path / "rescale"])
    assert "target_modules" not in human

    first = sorted(wrapped)[0]
    code, _, err = run_cli(["convert", src, "--to", "peft", "--exclude", f"^{first}$", "-o", tmp_path / "fewer", "-q"])
    assert code == 0, err
    written = json.loads((tmp_path / "fewer" / "adapter_config.json").read_text())["target_modules"]
    assert written == sorted(wrapped - {first}) and _peft_wrapped(tmp_path / "fewer", kind) == wrapped - {first}


def test_onnx_adapter_is_written_for_the_graph_it_names(tmp_path) -> None:
    """A PEFT adapter on every BERT `dense` adapts the pooler too, which an export for last_hidden_state
    leaves out. convert --to onnx-adapter needs --for: the file then leaves the pooler out (with a note)
    and runs in onnxruntime with the slot graph, giving PEFT's outputs; the tensors of every module (what
    convert wrote without --for) make onnxruntime fail with 'Invalid input name'."""
    pytest.importorskip("onnxruntime")
    import models
    import numpy as np
    import torch

    from loratools.formats.adapter_io import load_adapter, save_adapter
    from loratools.onnx.runtime import run_with_adapter, session

    model = models.build_model("bert", seed=0)
    base = models.save_base(model, tmp_path / "bert")
    peft = models.make_peft(model, tmp_path / "dense", kind="bert", target_modules=["dense"], seed=3)
    code, _, err = models.run_cli(["export-onnx", base, "--lora-slots", tmp_path / "dense", "-o", tmp_path / "slots"])
    assert code == 0, err
    target = tmp_path / "a.onnx_adapter"
    code, out, err = models.run_cli(["convert", tmp_path / "dense", "--to", "onnx-adapter", "-o", target])
    assert code == 2 and out == "" and not target.exists()
    assert err.splitlines()[0].startswith("Error: an .onnx_adapter file feeds the LoRA inputs of one ONNX graph")
    args = ["convert", tmp_path / "dense", "--to", "onnx-adapter", "--for", tmp_path / "slots", "-o", target]
    code, out, err = models.run_cli(args)
    assert code == 0 and "skipped pooler.dense" in out, err

    sess = session(tmp_path / "slots" / "model.onnx")
    inputs = models.sample_inputs()
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs() if i.name in inputs}
    got = run_with_adapter(sess, feed, target)[0]
    assert np.abs(got - models.outputs(peft, inputs).numpy()).max() <= 1e-4  # PEFT is the oracle
    every = tmp_path / "every.onnx_adapter"  # what the old convert wrote: a tensor for the pooler too
    save_adapter(load_adapter(tmp_path / "dense"), every, format="onnx-adapter")
    with pytest.raises(Exception, match="Invalid input name"):
        run_with_adapter(sess, feed, every)


@pytest.mark.parametrize("command", ["rescale", "resize", "combine"])
def test_other_writers_refuse_an_onnx_adapter_without_its_graph(tmp_path, command: str) -> None:
    from models import run_cli

    lora = adapter_dir("llama-lora")
    args = {"rescale": [lora, "--scale", "2"], "resize": [lora, "--rank", "2"], "combine": [lora, lora]}[command]
    out = tmp_path / "a.onnx_adapter"
    code, stdout, err = run_cli([command, *args, "--to", "onnx-adapter", "-o", out])
    assert code == 2 and stdout == "" and not out.exists()
    assert err.splitlines() == [
        f"Error: {command} cannot write an .onnx_adapter file: it is made for one ONNX graph, named with convert --for",
        "Hint: write peft here, then: loratools convert OUT --to onnx-adapter --for MODEL -o OUT",
    ]


def test_safetensors_writer_errors_are_mapped_for_the_output(tmp_path) -> None:
    """safetensors' save_file wraps the OS error in its own type; the text is what it raised on a full tmpfs here."""
    from safetensors import SafetensorError

    from loratools.publishing.write_errors import output_write_errors

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(DiskSpaceError, match="the disk filled up"), output_write_errors(tmp_path / "out"):
        raise full
    with pytest.raises(SafetensorError), output_write_errors(tmp_path / "out"):  # not an OS error: as it was
        raise SafetensorError("Error while serializing: header too large")
