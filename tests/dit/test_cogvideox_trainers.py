"""CogVideoX LoRAs of the trainers beyond diffusers' example and CogVideoX-Fun (issue 21, item 1).

- finetrainers (huggingface/finetrainers): the fixture is written by finetrainers' own saving steps run here
  (``trainer/sft_trainer/trainer.py``: ``get_peft_model_state_dict`` of the LoRA-injected transformer, then
  ``models/cogvideox/base_specification.py``: ``CogVideoXPipeline.save_lora_weights`` with a save function whose
  metadata is ``{"lora_config": json}``); the oracle is finetrainers' own loader
  (``patches/dependencies/diffusers/peft.py``: ``LoraConfig(**lora_config)``, ``inject_adapter_in_model``,
  ``set_peft_model_state_dict``), run here the same way; diffusers' ``load_lora_weights`` ignores lora_config.
- DiffSynth-Studio 1.x (``diffsynth/models/lora.py`` GeneralLoRAFromPeft over ``cog_dit.py``'s CogDiT, the
  loader of ECNU-CILab's ExVideo-CogVideoX LoRA; DiffSynth 2.0 dropped CogVideoX): its package imports modelscope,
  torchvision and more that this environment lacks, so the files are built byte for byte by its key rule as read in
  its source (checked once by hand against diffsynth 1.1.9's own loader: docs/formats.md) —
  ``[diffusion_model.]<CogDiT parameter path without .weight>.lora_B[.default].weight`` — and merged by its rule
  (W += up·down, no alpha read) written out here.
- musubi-tuner and ai-toolkit do not train CogVideoX (no CogVideoX network or model in either; docs/formats.md).
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cogvideox import _forward, _linears, tiny_model, tiny_pipeline, tiny_t5

from loratools import load_adapter, merge, save_adapter


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def pipeline(model, tmp_path_factory):
    return tiny_pipeline(model, tiny_t5(), tmp_path_factory.mktemp("cog-trainers") / "pipe")


#: finetrainers' SFT default target (finetrainers/trainer/sft_trainer/config.py)
TARGETS = "(transformer_blocks|single_transformer_blocks).*(to_q|to_k|to_v|to_out.0)"


def _finetrainers_file(model, folder, alpha_pattern=None):
    """finetrainers' save steps: PEFT-injected transformer -> get_peft_model_state_dict -> save_lora_weights."""
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file as safetensors_torch_save_function

    trained = copy.deepcopy(model)
    cfg = LoraConfig(r=4, lora_alpha=12, init_lora_weights=True, target_modules=TARGETS,
                     alpha_pattern=alpha_pattern or {})  # fmt: skip
    inject_adapter_in_model(cfg, trained)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = get_peft_model_state_dict(trained)
    metadata = {"r": 4, "lora_alpha": 12, "init_lora_weights": True, "target_modules": TARGETS}
    if alpha_pattern:  # the control trainer's field (alpha_pattern beside r/lora_alpha)
        metadata["alpha_pattern"] = alpha_pattern
    metadata = {"lora_config": json.dumps(metadata, indent=4)}
    CogVideoXPipeline.save_lora_weights(
        str(folder),
        state,
        save_function=functools.partial(safetensors_torch_save_function, metadata=metadata),
        safe_serialization=True,
    )
    return folder / "pytorch_lora_weights.safetensors"


def _finetrainers_load(model, path):
    """finetrainers' load_lora_weights (patches/dependencies/diffusers/peft.py), on a bare transformer."""
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state = CogVideoXPipeline.lora_state_dict(str(path))
    state = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
    with safe_open(str(path), framework="pt") as f:
        cfg = json.loads(f.metadata()["lora_config"])
    theirs = copy.deepcopy(model)
    inject_adapter_in_model(LoraConfig(**cfg), theirs, adapter_name="default")
    result = set_peft_model_state_dict(theirs, state, adapter_name="default", ignore_mismatched_sizes=False)
    assert not result.unexpected_keys
    return theirs


@pytest.mark.parametrize("alpha_pattern", [None, {"transformer_blocks.1.attn1.to_v": 2}])
def test_finetrainers_lora_config_scale_merges_like_finetrainers(model, pipeline, tmp_path, alpha_pattern):
    path = _finetrainers_file(model, tmp_path / "ft", alpha_pattern)
    with safe_open(str(path), framework="pt") as f:  # finetrainers' key, not diffusers' lora_adapter_metadata
        assert set(f.metadata()) == {"lora_config"}
    adapter = load_adapter(path)
    q = adapter.modules["transformer.transformer_blocks.0.attn1.to_q"]
    assert q.alpha == 12 and q.scale == 3  # lora_alpha/r, not diffusers' alpha = rank
    if alpha_pattern:
        assert adapter.modules["transformer.transformer_blocks.1.attn1.to_v"].alpha == 2
    merge(pipeline, [path], tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    theirs = _finetrainers_load(model, path)
    merged = copy.deepcopy(model)
    merged.load_state_dict(ours)
    base_out, lora_out, merged_out = _forward(model), _forward(theirs), _forward(merged)
    assert float((lora_out - base_out).abs().max()) > 1e-2  # parity first: the LoRA moves the output
    assert float((merged_out - lora_out).abs().max()) <= 1e-4
    for module in (m for _, m in theirs.named_modules() if hasattr(m, "merge") and hasattr(m, "lora_A")):
        module.merge()
    fused = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    assert max(float((ours[k] - fused[k]).abs().max()) for k in ours) <= 1e-5
    # written back as diffusers, the scale rides in lora_adapter_metadata (diffusers' loader then agrees)
    back = load_adapter(save_adapter(adapter, tmp_path / "diffusers", format="diffusers"))
    assert all(torch.allclose(back.modules[k].delta(), m.delta()) for k, m in adapter.modules.items())


def test_diffusers_loader_ignores_finetrainers_lora_config(model, tmp_path):
    """Why the reader takes lora_config: diffusers' load_lora_weights path takes alpha = rank on the same file."""
    from diffusers import CogVideoXPipeline

    path = _finetrainers_file(model, tmp_path / "ft")
    lora, meta = CogVideoXPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    assert not meta
    theirs = copy.deepcopy(model)
    CogVideoXPipeline.load_lora_into_transformer(lora, transformer=theirs, adapter_name="x", metadata=meta)
    ours = _finetrainers_load(model, path)
    assert float((_forward(theirs) - _forward(ours)).abs().max()) > 1e-2


#: DiffSynth-Studio 1.x CogDiT names (diffsynth/models/cog_dit.py CogDiTStateDictConverter.from_diffusers), written
#: out here independently: diffusers path -> DiffSynth path
DIFFSYNTH_INNER = {"attn1.to_q": "attn1.to_q", "attn1.to_k": "attn1.to_k", "attn1.to_v": "attn1.to_v",
                   "attn1.to_out.0": "attn1.to_out", "norm1.linear": "norm1.linear", "norm2.linear": "norm2.linear",
                   "ff.net.0.proj": "ff.0", "ff.net.2": "ff.2"}  # fmt: skip
DIFFSYNTH_TOP = {"patch_embed.text_proj": "context_embedder",
                 "time_embedding.linear_1": "time_embedder.timestep_embedder.0",
                 "time_embedding.linear_2": "time_embedder.timestep_embedder.2", "norm_out.linear": "norm_out.linear",
                 "proj_out": "proj_out"}  # fmt: skip


def _diffsynth_name(name: str) -> str | None:
    if name in DIFFSYNTH_TOP:
        return DIFFSYNTH_TOP[name]
    parts = name.split(".")
    if parts[0] == "transformer_blocks" and ".".join(parts[2:]) in DIFFSYNTH_INNER:
        return f"blocks.{parts[1]}.{DIFFSYNTH_INNER['.'.join(parts[2:])]}"
    return None


def diffsynth_lora(model, prefix="", adapter_name=True):
    """A LoRA on every Linear CogDiT names, in GeneralLoRAFromPeft's key form (rank differing per module)."""
    g = torch.Generator().manual_seed(5)
    out = {}
    infix = ".default" if adapter_name else ""
    for i, (name, lin) in enumerate(_linears(model)):
        target = _diffsynth_name(name)
        if target is None:
            continue
        r = 2 + i % 2
        out[f"{prefix}{target}.lora_A{infix}.weight"] = torch.randn(r, lin.in_features, generator=g) * 0.3
        out[f"{prefix}{target}.lora_B{infix}.weight"] = torch.randn(lin.out_features, r, generator=g) * 0.3
    return out


def _diffsynth_merge(model, state, prefix="", adapter_name=True):
    """GeneralLoRAFromPeft.load: W += alpha · up @ down with the caller's alpha (1.0 by default), no alpha key."""
    want = {k: v.clone() for k, v in model.state_dict().items()}
    infix = ".default" if adapter_name else ""
    for name, _ in _linears(model):
        target = _diffsynth_name(name)
        if target is not None and f"{prefix}{target}.lora_B{infix}.weight" in state:
            up, down = state[f"{prefix}{target}.lora_B{infix}.weight"], state[f"{prefix}{target}.lora_A{infix}.weight"]
            want[f"{name}.weight"] += up @ down
    return want


@pytest.mark.parametrize(("prefix", "adapter_name"), [("", True), ("diffusion_model.", False), ("", False)])
def test_diffsynth_cogdit_names_merge_by_its_rule(model, pipeline, tmp_path, prefix, adapter_name):
    path = tmp_path / "diffsynth.safetensors"
    state = diffsynth_lora(model, prefix, adapter_name)
    save_file(state, str(path))
    adapter = load_adapter(path)
    layout = "comfyui" if prefix else "original"  # bare names: DiffSynth's own files
    assert adapter.meta["dit"] == {"family": "cogvideox", "layout": layout}
    assert all(m.scale == 1 for m in adapter.modules.values())
    merge(pipeline, [path], tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = _diffsynth_merge(model, state, prefix, adapter_name)
    assert set(ours) == set(want)
    assert max(float((ours[k] - want[k]).abs().max()) for k in ours) <= 1e-5
    assert max(float((ours[k] - model.state_dict()[k]).abs().max()) for k in ours) > 1e-2  # it moved


def test_diffsynth_converts_losslessly_to_every_layout(model, tmp_path):
    path = tmp_path / "diffsynth.safetensors"
    save_file(diffsynth_lora(model), str(path))
    first = load_adapter(path)
    for fmt in ("kohya", "comfyui", "diffusers"):
        back = load_adapter(save_adapter(first, tmp_path / (fmt if fmt == "diffusers" else f"{fmt}.safetensors"),
                                         format=fmt))  # fmt: skip
        assert len(back.modules) == len(first.modules)
        deltas = sorted(float(m.delta().norm()) for m in back.modules.values())
        assert deltas == pytest.approx(sorted(float(m.delta().norm()) for m in first.modules.values()), rel=1e-6)


# ComfyUI's LoRA key mapping, re-implemented from comfy/lora.py as read (comfyanonymous/ComfyUI at 41444b5: the
# whole repository is too large to fetch here and comfy/ imports its model-management stack): model_lora_keys_unet
# maps every ``diffusion_model.<path>.weight`` of the model's state dict from ``lora_unet_<path with _>`` and from
# ``diffusion_model.<path>`` (its "generic lora format"); its only diffusers-name maps are for UNets, SD3, AuraFlow,
# HunyuanDiT and Flux, none for CogVideoX. load_lora then consumes ``<x>.alpha`` and one of its up/down spellings per
# mapped name and warns "lora key not loaded" for the rest. The state dict is ComfyUI's CogVideoX model's
# (comfy/ldm/cogvideo/model.py), whose names are written out here from reading it.
_COMFY_INNER = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
                "attn1.norm_q": "norm_q", "attn1.norm_k": "norm_k", "ff.net.0.proj": "ff_proj",
                "ff.net.2": "ff_out"}  # fmt: skip
_COMFY_TOP = {"time_embedding.linear_1": "time_embedding_linear_1",
              "time_embedding.linear_2": "time_embedding_linear_2"}  # fmt: skip
_COMFY_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))  # fmt: skip


def _comfy_state_key(key: str) -> str:
    stem, _, leaf = key.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "transformer_blocks":
        inner = ".".join(parts[2:])
        return f"blocks.{parts[1]}.{_COMFY_INNER.get(inner, inner)}.{leaf}"
    return f"{_COMFY_TOP.get(stem, stem)}.{leaf}"


def comfy_key_map(model) -> dict[str, str]:
    """model_lora_keys_unet's generic branch over ComfyUI's CogVideoX model (``diffusion_model.`` + its keys)."""
    key_map = {}
    for k in (f"diffusion_model.{_comfy_state_key(k)}" for k in model.state_dict()):
        if k.endswith(".weight"):
            path = k[len("diffusion_model.") : -len(".weight")]
            key_map[f"lora_unet_{path.replace('.', '_')}"] = k
            key_map[k[: -len(".weight")]] = k
        else:
            key_map[k] = k
    return key_map


def comfy_load(lora: dict[str, torch.Tensor], key_map: dict[str, str]):
    """load_lora + the "lora" weight adapter: ``{model key: alpha/rank · up @ down}`` and the keys it leaves."""
    loaded, deltas = set(), {}
    for x, to in key_map.items():
        alpha = float(lora[f"{x}.alpha"]) if f"{x}.alpha" in lora else None
        if alpha is not None:
            loaded.add(f"{x}.alpha")
        for up, down in _COMFY_PAIRS:
            if x + up in lora:
                u, d = lora[x + up], lora[x + down]
                deltas[to] = (alpha / d.shape[0] if alpha is not None else 1.0) * u @ d
                loaded |= {x + up, x + down}
                break
    return deltas, set(lora) - loaded


def test_comfyui_output_loads_in_comfys_key_mapping_with_nothing_left(model, pipeline, tmp_path):
    """Every tensor of ``convert --to comfyui`` maps in ComfyUI's loader, and what it applies is the merge; the
    kohya (CogVideoX-Fun) and diffusers files map nothing there — the ComfyUI output is the one for ComfyUI."""
    from test_cogvideox import _fun_merge, fun_lora

    kohya = tmp_path / "fun.safetensors"
    state = fun_lora(model)
    save_file(state, str(kohya))
    comfy = save_adapter(load_adapter(kohya), tmp_path / "c.safetensors", format="comfyui")
    key_map = comfy_key_map(model)
    deltas, left = comfy_load(load_file(str(comfy)), key_map)
    assert not left
    want = _fun_merge(model, state)
    assert len(deltas) == sum(1 for k in state if k.endswith(".lora_up.weight"))
    for name, w in model.state_dict().items():
        to = f"diffusion_model.{_comfy_state_key(name)}"
        if to in deltas:
            assert float((w + deltas[to] - want[name]).abs().max()) <= 1e-5
    assert comfy_load(state, key_map)[0] == {}  # CogVideoX-Fun's lora_unet__ names are the wrapper's, not ComfyUI's
    diffusers = save_adapter(load_adapter(kohya), tmp_path / "d", format="diffusers")
    assert comfy_load(load_file(str(diffusers / "pytorch_lora_weights.safetensors")), key_map)[0] == {}


def test_finetrainers_file_converts_to_comfyui_with_its_base(model, pipeline, tmp_path):
    """finetrainers' default (attn1 only, diffusers names LTX-Video shares) is refused as ComfyUI alone (one line),
    written with the CogVideoX base as ComfyUI's names, every key mapped, alpha/r kept."""
    from loratools.errors import UnsupportedError
    from loratools.ops.convert import convert

    path = _finetrainers_file(model, tmp_path / "ft")
    with pytest.raises(UnsupportedError, match="LTX-Video and CogVideoX share"):
        convert(path, "comfyui", tmp_path / "alone.safetensors")
    convert(path, "comfyui", tmp_path / "c.safetensors", base=pipeline)
    lora = load_file(str(tmp_path / "c.safetensors"))
    deltas, left = comfy_load(lora, comfy_key_map(model))
    assert not left and len(deltas) == 8  # q, k, v, attn_out in two blocks
    theirs = _finetrainers_load(model, path)
    for module in (m for _, m in theirs.named_modules() if hasattr(m, "merge") and hasattr(m, "lora_A")):
        module.merge()
    fused = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    for name, w in model.state_dict().items():
        to = f"diffusion_model.{_comfy_state_key(name)}"
        if to in deltas:
            assert float((w + deltas[to] - fused[name]).abs().max()) <= 1e-5


@pytest.mark.parametrize("kind", ["diffsynth", "finetrainers"])
def test_wrong_shapes_against_the_base_are_refused_naming_file_and_module(model, pipeline, tmp_path, kind):
    """A factor whose width is not the base weight's: merge refuses in one line naming the file and the module."""
    from loratools.errors import LoratoolsError

    path = tmp_path / f"{kind}-wide.safetensors"
    if kind == "diffsynth":
        state = diffsynth_lora(model)
        state["blocks.0.attn1.to_q.lora_A.default.weight"] = torch.ones(2, 20)
        save_file(state, str(path))
    else:
        path = _finetrainers_file(model, tmp_path / "ft")
        state = load_file(str(path))
        state["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.ones(4, 20)
        save_file(state, str(path), metadata={"lora_config": json.dumps({"r": 4, "lora_alpha": 12})})
    with pytest.raises(LoratoolsError) as err:
        merge(pipeline, [path], tmp_path / "out")
    assert path.name in str(err.value) and "transformer_blocks.0.attn1.to_q" in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_diffsynth_merges_into_a_comfyui_checkpoint(model, tmp_path):
    """DiffSynth names (read as aliases) land on ComfyUI's checkpoint names (model.diffusion_model.blocks.N.q)."""
    path = tmp_path / "diffsynth.safetensors"
    state = diffsynth_lora(model)
    save_file(state, str(path))
    base = tmp_path / "cogvideox_comfy.safetensors"
    save_file({f"model.diffusion_model.{_comfy_state_key(k)}": v.contiguous() for k, v in model.state_dict().items()},
              str(base))  # fmt: skip
    merge(base, [path], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    want = {f"model.diffusion_model.{_comfy_state_key(k)}": v for k, v in _diffsynth_merge(model, state).items()}
    assert set(merged) == set(want)
    assert max(float((merged[k] - want[k]).abs().max()) for k in merged) <= 1e-5
