"""Results lost silently (issue 19 section 2).

2.1: every adapter writer refuses, in one line with a hint, a part of the adapter it cannot carry (the
table below), and what it carries reads back unchanged; a trained ``modules_to_save`` tensor is refused
by ``--to gguf`` and lowered exactly by ``--as-lora --base``.

2.4: ``--overwrite`` replaces a single file only when it is a previous loratools output (our provenance
record in its safetensors/GGUF metadata, a PNG text chunk, a Modelfile comment), as folders already were;
a folder output named like a file (``merge FOLDER -o x.safetensors``) is refused.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from foundation_support import FIXTURES
from models import run_cli

PEFT = FIXTURES / "peft"
LLAMA = FIXTURES / "bases" / "llama"
LORA = PEFT / "llama-lora"
SLOTS = FIXTURES / "genai" / "llama-lora-slots"  # convert --to onnx-adapter needs the graph it feeds


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _writers(out: Path) -> dict[str, list]:
    """Commands that write one file at ``out`` (its suffix picks the format)."""
    return {
        "gguf": ["convert", LORA, "--to", "gguf", "--base", LLAMA, "-o", out],
        "kohya": ["convert", LORA, "--to", "kohya", "--kohya-prefix", "lora_te_", "-o", out],
        "onnx-adapter": ["convert", LORA, "--to", "onnx-adapter", "--for", SLOTS, "-o", out],
        "plot": ["spectrum", LORA, "--plot", out],
    }


def _foreign(kind: str, path: Path) -> Path:
    """A file loratools did not write, at ``path``."""
    if kind == "notes":
        path.write_text("my notes\n")
    elif kind == "transformers":
        shutil.copy(LLAMA / "model.safetensors", path)
    elif kind == "lycoris":
        shutil.copy(FIXTURES / "families" / "lycoris-loha.safetensors", path)
    elif kind == "gguf-model":
        shutil.copy(FIXTURES / "gguf" / "llama-f32.gguf", path)
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + bytes(17))
    return path


@pytest.mark.parametrize(
    ("writer", "foreign", "name"),
    [
        ("gguf", "notes", "notes.txt"),  # the issue's own example
        ("gguf", "gguf-model", "model.gguf"),
        ("kohya", "transformers", "model.safetensors"),
        ("kohya", "lycoris", "style.safetensors"),
        ("plot", "png", "holiday.png"),
    ],
)
def test_overwrite_refuses_a_file_loratools_did_not_write(writer, foreign, name, tmp_path: Path) -> None:  # noqa: ANN001
    target = _foreign(foreign, tmp_path / name)
    before = _digest(target)
    code, out, err = run_cli([*_writers(target)[writer], "--overwrite"])
    assert code == 2, out + err  # was: 0, the file replaced
    first = err.splitlines()[0]
    assert first.startswith(f"Error: refusing to replace {target}: it is not a previous loratools output"), err
    assert "Hint: write to a new path" in err
    assert _digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left


@pytest.mark.parametrize(("writer", "name"), [
    ("gguf", "a.gguf"), ("kohya", "a.safetensors"), ("onnx-adapter", "a.onnx_adapter"), ("plot", "a.png"),
])  # fmt: skip
def test_overwrite_replaces_our_own_file(writer: str, name: str, tmp_path: Path) -> None:
    target = tmp_path / name
    args = _writers(target)[writer]
    code, _, err = run_cli(args)
    assert code == 0, err
    code, _, err = run_cli(args)
    assert code == 2 and "exists already" in err
    code, _, err = run_cli([*args, "--overwrite"])
    assert code == 0, err


def test_ollama_modelfile_is_ours_to_replace_and_a_users_is_not(tmp_path: Path) -> None:
    out = tmp_path / "a.gguf"
    args = ["convert", LORA, "--to", "gguf", "--base", FIXTURES / "gguf" / "llama-f32.gguf", "-o", out, "--ollama"]
    assert run_cli(args)[0] == 0
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert lines[0].startswith("FROM ") and lines[1] == "ADAPTER ./a.gguf" and lines[2].startswith("# loratools {")
    code, _, err = run_cli([*args, "--overwrite"])
    assert code == 0, err
    (tmp_path / "Modelfile").write_text("FROM llama3\nSYSTEM you are my assistant\n")
    out.unlink()
    code, _, err = run_cli([*args, "--overwrite"])
    assert code == 2 and f"refusing to replace {tmp_path / 'Modelfile'}" in err, err
    assert "SYSTEM" in (tmp_path / "Modelfile").read_text()


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_a_folder_merge_named_like_a_file_is_refused(overwrite: tuple, tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    code, out, err = run_cli(["merge", LLAMA, LORA, "-o", target, *overwrite])
    assert code == 2, out + err  # was: a folder named x.safetensors
    assert err.startswith(f"Error: {target}: this output is a folder, but the name is that of a .safetensors file")
    assert "-o merged/" in err
    assert not list(tmp_path.iterdir())


# 2.1: every writer refuses a part of the adapter it cannot carry, and never drops one. Each cell is the
# refusal expected (a substring of its message), or None: the part is carried, and reads back unchanged.
PARTS = ("replacement", "bias", "dora", "mixed_dora", "embedding", "fifo", "mixed_rslora", "family", "tokens", "alora")
WRITERS = ("peft", "kohya", "diffusers", "gguf", "onnx-adapter")
EXPECTED = {
    "peft": dict(mixed_dora="use_dora", mixed_rslora="rsLoRA", tokens="trainable_token_indices"),
    "kohya": dict(replacement="modules_to_save", bias="bias", embedding="embedding", fifo="fan_in_fan_out",
                  tokens="trainable_token_indices", alora="invocation tokens"),
    "diffusers": dict(replacement="modules_to_save", mixed_dora="use_dora", fifo="fan_in_fan_out",
                      mixed_rslora="rsLoRA", family="not plain LoRA", tokens="trainable_token_indices",
                      alora="invocation tokens"),
    "gguf": dict(replacement="full tensors", bias="biases", dora="DoRA", mixed_dora="DoRA", family="not plain LoRA",
                 tokens="trainable_token_indices"),
    "onnx-adapter": dict(replacement="modules_to_save", bias="a LoRA bias", dora="DoRA", mixed_dora="DoRA",
                         embedding="embedding", family="not plain LoRA", tokens="trainable_token_indices",
                         alora="invocation tokens"),
}  # fmt: skip
#: parts a writer is not asked about: the fixture's model has no counterpart in that format
SKIP = {("gguf", "fifo"), ("diffusers", "embedding"), ("diffusers", "bias")}


def _part(part: str):  # noqa: ANN202
    """An in-memory adapter whose one special part is ``part`` (every delta non-zero)."""
    import torch

    from loratools import load_adapter

    g = torch.Generator().manual_seed(5)
    name = {"bias": "llama-bias", "dora": "llama-dora", "mixed_dora": "llama-dora", "embedding": "llama-embed",
            "fifo": "gpt2-lora", "mixed_rslora": "llama-rslora"}.get(part, "llama-lora")  # fmt: skip
    if part == "family":
        return load_adapter(FIXTURES / "families" / "peft-loha")
    ad = load_adapter(PEFT / name, base=FIXTURES / "bases" / ("gpt2" if part == "fifo" else "llama"))
    first = sorted(ad.modules)[0]
    if part == "replacement":
        ad.replacements["lm_head.weight"] = torch.randn(96, 32, generator=g)
    elif part == "mixed_dora":
        ad.modules[first].magnitude = None
    elif part == "mixed_rslora":
        ad.modules[first].use_rslora = False
    elif part == "tokens":
        ad.meta["trainable_tokens"] = {"model.embed_tokens": {3: torch.randn(32, generator=g)}}
    elif part == "alora":
        ad.meta["alora_invocation_tokens"] = [5, 7]
    ad.replacements = {k: v for k, v in ad.replacements.items() if part in ("replacement", "embedding")}
    return ad


def _for_writer(ad, writer: str):  # noqa: ANN001, ANN202
    if writer == "diffusers":  # a diffusers LoRA adapts a pipeline component
        return ad.renamed({n: f"text_encoder.{n}" for n in ad.modules})
    return ad


def _carried(ad, back) -> None:  # noqa: ANN001
    """Everything of ``ad`` is in ``back``: the same modules, ΔW, magnitudes, biases and full tensors."""
    import torch

    assert sorted(back.modules) == sorted(ad.modules)
    for n, m in ad.modules.items():
        b = back.modules[n]
        if hasattr(m, "delta"):  # compared as out×in matrices: a reader may store another layout
            da, db = m.from_weight_layout(m.delta()), b.from_weight_layout(b.delta())
            assert torch.allclose(da, db, rtol=1e-5, atol=1e-7), n
            for attr in ("magnitude", "bias"):
                x, y = getattr(m, attr), getattr(b, attr)
                assert (x is None) == (y is None), (n, attr)
                if x is not None:
                    assert torch.allclose(x.float(), y.float()), (n, attr)
    from loratools.checkpoint.reader import open_checkpoint

    base = open_checkpoint(FIXTURES / "bases" / "llama")
    for key, t in ad.replacements.items():  # left out only when it equals the base's own (PEFT's saved base_layer)
        assert key in back.replacements or torch.equal(t, base.get(key).to(t.dtype)), key


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("writer", WRITERS)
def test_a_writer_refuses_what_it_cannot_carry(writer: str, part: str, tmp_path: Path) -> None:
    from loratools import load_adapter
    from loratools.errors import LoratoolsError
    from loratools.formats.adapter_io import save_adapter

    if (writer, part) in SKIP:
        pytest.skip("no such part in this format's models")
    ad = _for_writer(_part(part), writer)
    suffix = {"peft": "", "diffusers": "", "kohya": ".safetensors", "gguf": ".gguf", "onnx-adapter": ".onnx_adapter"}
    out = tmp_path / f"out{suffix[writer]}"
    from loratools.ops._algebra_io import gguf_base

    options = {"base": gguf_base(FIXTURES / "bases" / "llama")} if writer == "gguf" else {}  # as convert opens it
    if writer == "kohya":
        options["kohya_prefix"] = "lora_te_"
    want = EXPECTED[writer].get(part)
    if want is None:
        save_adapter(ad, out, format=writer, **options)
        _carried(ad, load_adapter(out, base=FIXTURES / "bases" / "llama") if writer == "kohya" else load_adapter(out))
        return
    with pytest.raises(LoratoolsError) as exc:
        save_adapter(ad, out, format=writer, **options)
    assert want in exc.value.message, exc.value.message
    assert "\n" not in exc.value.message and exc.value.hint
    assert not list(tmp_path.iterdir())  # nothing written


def test_gguf_refuses_a_trained_modules_to_save_and_lowers_it_with_as_lora(tmp_path: Path) -> None:
    """A trained lm_head copy is refused by --to gguf in one line with the ways out; with --as-lora --base
    it becomes an exact (here full-rank) LoRA of W_saved − W_base, and the LoRA modules stay as they were."""
    import torch
    from safetensors.torch import load_file, save_file

    from loratools import load_adapter

    src = tmp_path / "mts"
    shutil.copytree(PEFT / "llama-mts", src)
    sd = load_file(src / "adapter_model.safetensors")
    key = "base_model.model.lm_head.weight"
    sd[key] = sd[key] + 0.05 * torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(2))
    save_file(sd, str(src / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "a.gguf"
    code, stdout, err = run_cli(["convert", src, "--to", "gguf", "--base", LLAMA, "-o", out])
    assert code == 2 and not out.exists(), stdout + err
    first, hint = err.splitlines()[0], err.splitlines()[1]
    assert "lm_head.weight" in first and "modules_to_save" in first, first
    assert "--as-lora --base" in hint and "loratools merge" in hint, hint
    code, _, err = run_cli(["convert", src, "--to", "gguf", "--as-lora", "--base", LLAMA, "-o", out])
    assert code == 0, err
    back, orig = load_adapter(out), load_adapter(src)
    want = sd[key].double() - load_file(LLAMA / "model.safetensors")["lm_head.weight"].double()
    head = back.modules["lm_head"]
    assert head.rank == 32  # W_saved − W_base of a 96×32 head: full rank
    assert float((head.delta().double() - want).norm() / want.norm()) < 1e-6
    for name, m in orig.modules.items():
        assert torch.allclose(back.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-7), name
