"""Hostile inputs for the adapter families (issue 19 §3): LyCORIS LoHa/LoKr/diag-OFT files and PEFT
LoHa/LoKr/OFT/BOFT/IA3/DoRA folders whose tensors or config values are wrong, absurd or non-finite.

Every case starts from a valid seed written by the peers' own code (lycoris-lora's writer and PEFT's
``save_pretrained``: fixtures/families, fixtures/peft/llama-dora) and damages one tensor or one config value.
Cases whose damage only shows against the base (a LoKr product or an (IA)³ vector of the wrong size) list
the commands that have the base: ``validate --base`` (a finding, exit 1) and ``merge`` (refused).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from hostile import ADAPTER_COMMANDS, HostileCase
from reliability_support import FIXTURES, LLAMA_BASE

FAMILIES = FIXTURES / "families"
UNET = FAMILIES / "tiny-unet"
PEFT_DORA = FIXTURES / "peft" / "llama-dora"
P = "base_model.model.model.layers.0."

#: LyCORIS files are trained on the tiny UNet stand-in; convert keeps the kohya layout (diag-OFT has no PEFT form)
LYCORIS_COMMANDS = {
    "info": ["info", "A"],
    "validate": ["validate", "A"],
    "validate-base": ["validate", "A", "--base", UNET],
    "convert": ["convert", "A", "--to", "kohya", "-o", "O"],
    "merge": ["merge", UNET, "A", "-o", "O"],
}
#: damage that only the base reveals
PEFT_BASE_ONLY = {"validate-base": ADAPTER_COMMANDS["validate-base"], "merge": ADAPTER_COMMANDS["merge"]}
LYCORIS_BASE_ONLY = {"validate-base": LYCORIS_COMMANDS["validate-base"], "merge": LYCORIS_COMMANDS["merge"]}

Edit = Callable[[dict[str, torch.Tensor]], None]


def lycoris_file(seed: str, edit: Edit, stem: str) -> Callable[[Path], Path]:
    """A copy of fixtures/families/``seed`` (lycoris-lora's writer) with ``edit`` applied to its tensors."""

    def build(folder: Path) -> Path:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        src = FAMILIES / seed
        tensors = load_file(str(src))
        with safe_open(str(src), "pt") as f:
            meta = f.metadata()
        edit(tensors)
        out = folder / f"{stem}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=meta)
        return out

    return build


def peft_folder(
    seed: Path, stem: str, edit: Edit | None = None, config: Callable[[dict], None] | None = None
) -> Callable[[Path], Path]:
    """A copy of the PEFT folder ``seed`` (PEFT's save_pretrained) with its tensors and/or config edited."""

    def build(folder: Path) -> Path:
        from safetensors.torch import load_file, save_file

        out = folder / stem
        shutil.copytree(seed, out)
        if edit is not None:
            st = out / "adapter_model.safetensors"
            tensors = load_file(str(st))
            edit(tensors)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(st), metadata={"format": "pt"})
        if config is not None:
            cfg_path = out / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            config(cfg)
            cfg_path.write_text(json.dumps(cfg))
        return out

    return build


def put(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = value(t[key])

    return edit


def put_all(*edits: Edit) -> Edit:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for e in edits:
            e(t)

    return edit


def setting(**values: object) -> Callable[[dict], None]:
    def config(cfg: dict) -> None:
        cfg.update(values)

    return config


def const(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.tensor(value, dtype=t.dtype)


def _cases() -> list[HostileCase]:
    cases: list[HostileCase] = []

    def lyc(name: str, seed: str, edit: Edit, expect: list[str], validate_exit: int = 1, commands=None) -> None:
        cases.append(
            HostileCase(
                f"families-{name}",
                lycoris_file(seed, edit, f"hostile-{name}"),
                expect,
                dict(commands or LYCORIS_COMMANDS),
                validate_exit,
                name_in_error=True,
            )
        )

    def peft(
        name: str, seed: Path, expect: list[str], edit=None, config=None, validate_exit: int = 1, commands=None
    ) -> None:
        cases.append(
            HostileCase(
                f"families-{name}",
                peft_folder(seed, f"hostile-{name}", edit, config),
                expect,
                dict(commands or ADAPTER_COMMANDS),
                validate_exit,
                name_in_error=True,
            )
        )

    q, ff, pin, pout = (f"lycoris_down_blocks_0_{m}" for m in ("to_q", "ff", "proj_in", "proj_out"))

    # -- non-finite or absurd alphas (the reader took a non-finite alpha for "no alpha") ------------------------
    for tag, seed, mod, value in (
        ("nan", "lycoris-loha.safetensors", q, float("nan")),
        ("inf", "lycoris-lokr.safetensors", ff, float("inf")),
        ("neginf", "lycoris-loha-tucker.safetensors", pin, float("-inf")),
        ("huge-negative", "lycoris-loha.safetensors", pout, -1e30),
        ("huge", "lycoris-lokr.safetensors", q, 3e38),
    ):
        lyc(f"lycoris-alpha-{tag}", seed, put(f"{mod}.alpha", const(value)), [f"{mod}.alpha"])
    lyc("lycoris-alpha-f16-inf", "lycoris-loha.safetensors", put(f"{q}.alpha", lambda t: torch.tensor(float("inf"),
        dtype=torch.float16)), [f"{q}.alpha"])
    lyc("diag-oft-alpha-nan", "lycoris-oft.safetensors", put(f"{ff}.alpha", const(float("nan"))), [f"{ff}.alpha"])
    lyc("diag-oft-alpha-inf", "lycoris-oft.safetensors", put(f"{q}.alpha", const(float("inf"))), [f"{q}.alpha"])
    lyc("diag-oft-alpha-huge", "lycoris-oft.safetensors", put(f"{pin}.alpha", const(-1e30)), [f"{pin}.alpha"])
    lyc("kohya-lora-alpha-nan", "lycoris-loha.safetensors", _kohya_lora(float("nan")), ["lora_unet_x.alpha"])

    # -- LoHa factors of the wrong rank (3-D, 1-D, Tucker cores of 3 dims) ----------------------------------------
    lyc("loha-w1a-3d", "lycoris-loha.safetensors", put(f"{q}.hada_w1_a", lambda t: t[:, :, None]), [q, "hada_w1_a"])
    lyc("loha-w2b-3d", "lycoris-loha.safetensors", put(f"{ff}.hada_w2_b", lambda t: t[:, :, None]), [ff, "hada_w2_b"])
    lyc("loha-w1a-1d", "lycoris-loha.safetensors", put(f"{q}.hada_w1_a", lambda t: t[:, 0]), [q, "hada_w1_a"])
    lyc("loha-t1-2d", "lycoris-loha-tucker.safetensors", put(f"{pin}.hada_t1", lambda t: t.reshape(2, 18)),
        [pin, "hada_t1"])
    lyc("loha-t2-wrong-rank", "lycoris-loha-tucker.safetensors", put(f"{pin}.hada_t2", lambda t: t.repeat(2, 1, 1, 1)),
        [pin, "hada_t2"])
    peft("peft-loha-w1b-3d", FAMILIES / "peft-loha", [f"{P[17:]}mlp.down_proj", "hada_w1_b"],
         edit=put(f"{P}mlp.down_proj.hada_w1_b", lambda t: t[:, :, None]))
    # -- empty rank ---------------------------------------------------------------------------------------------
    lyc("loha-rank-0", "lycoris-loha.safetensors", _empty_loha(q), [q])
    lyc("lokr-rank-0", "lycoris-lokr.safetensors", put_all(
        put(f"{ff}.lokr_w2_a", lambda t: t[:, :0]), put(f"{ff}.lokr_w2_b", lambda t: t[:0])), [ff])
    lyc("diag-oft-no-blocks", "lycoris-oft.safetensors", put(f"{q}.oft_blocks", lambda t: t[:0]), [q, "oft_blocks"])

    # -- LoKr lokr_w1 of the wrong size or rank -------------------------------------------------------------------
    lyc("lokr-w1-0d", "lycoris-lokr.safetensors", put(f"{ff}.lokr_w1", lambda t: t[0, 0]), [ff, "lokr_w1"])
    lyc("lokr-w1-1d", "lycoris-lokr.safetensors", put(f"{ff}.lokr_w1", lambda t: t.reshape(-1)), [ff, "lokr_w1"])
    lyc("lokr-w1-3d", "lycoris-lokr.safetensors", put(f"{ff}.lokr_w1", lambda t: t[:, :, None]), [ff, "lokr_w1"])
    lyc("lokr-w1-wrong-size", "lycoris-lokr.safetensors", put(f"{ff}.lokr_w1", lambda t: t[:3]),
        ["down_blocks.0.ff", "LoKr"],
        commands=LYCORIS_BASE_ONLY)
    peft("peft-lokr-w1-0d", FAMILIES / "peft-lokr-full", [f"{P[17:]}self_attn.k_proj", "lokr_w1"],
         edit=put(f"{P}self_attn.k_proj.lokr_w1", lambda t: t[0, 0]))
    peft("peft-lokr-kron-mismatch", FAMILIES / "peft-lokr-full", [f"{P[17:]}mlp.gate_proj"],
         edit=put(f"{P}mlp.gate_proj.lokr_w2", lambda t: t[:10]), commands=PEFT_BASE_ONLY)
    peft("peft-lokr-kron-transposed", FAMILIES / "peft-lokr-full", [f"{P[17:]}self_attn.k_proj"],
         edit=put(f"{P}self_attn.k_proj.lokr_w2", lambda t: t.T), commands=PEFT_BASE_ONLY)

    # -- DoRA magnitudes and LyCORIS dora_scale of the wrong shape ---------------------------------------------
    q0 = f"{P}self_attn.q_proj.lora_magnitude_vector"
    peft("dora-magnitude-row", PEFT_DORA, ["q_proj", "lora_magnitude_vector"], edit=put(q0, lambda t: t[None, :]))
    peft("dora-magnitude-column", PEFT_DORA, ["q_proj", "lora_magnitude_vector"], edit=put(q0, lambda t: t[:, None]))
    peft("dora-magnitude-0d", PEFT_DORA, ["q_proj", "lora_magnitude_vector"], edit=put(q0, lambda t: t[0]))
    lyc("dora-scale-short", "lycoris-loha-dora.safetensors", put(f"{ff}.dora_scale", lambda t: t[:20]),
        [ff, "dora_scale"])
    lyc("dora-scale-wrong-axis", "lycoris-loha-dora.safetensors", put(f"{ff}.dora_scale", lambda t: t.T),
        [ff, "dora_scale"])
    lyc("dora-scale-in-long", "lycoris-lokr-dora-in.safetensors",
        put(f"{ff}.dora_scale", lambda t: torch.cat([t, t], 1)), [ff, "dora_scale"])
    lyc("dora-scale-2-axes", "lycoris-loha-dora.safetensors", put(f"{q}.dora_scale", lambda t: t.repeat(1, 12)),
        [q, "dora_scale"])
    lyc("dora-scale-conv-short", "lycoris-loha-dora.safetensors", put(f"{pin}.dora_scale", lambda t: t[:5]),
        [pin, "dora_scale"])
    # -- LyCORIS diag-OFT rescale of the wrong shape -------------------------------------------------------------
    lyc("oft-rescale-short", "lycoris-oft.safetensors", put(f"{ff}.rescale", lambda t: t[:20]), [ff, "rescale"])
    lyc("oft-rescale-row", "lycoris-oft.safetensors", put(f"{ff}.rescale", lambda t: t.T), [ff, "rescale"])
    lyc("oft-rescale-wide", "lycoris-oft.safetensors", put(f"{ff}.rescale", lambda t: t.repeat(1, 3)),
        [ff, "rescale"])
    lyc("oft-rescale-nan", "lycoris-oft.safetensors", put(f"{ff}.rescale", lambda t: t * float("nan")),
        ["rescale", "NaN"])  # found after reading: named by the module's path in the base when there is one

    # -- PEFT OFT/BOFT config values that contradict the tensors or cost without bound ---------------------------
    oft = FAMILIES / "peft-oft"
    for tag, value in (("negative", -3), ("huge", 10**9), ("float", 2.5), ("string", "5"), ("bool", True)):
        peft(f"oft-neumann-terms-{tag}", oft, ["adapter_config.json", "num_cayley_neumann_terms"],
             config=setting(num_cayley_neumann_terms=value), validate_exit=2)
    # 32 inputs in blocks of 8: PEFT keeps a size that divides 32 (16, 4) and adjusts one that does not (12 -> 8)
    for size in (16, 4):
        peft(f"oft-block-size-{size}-contradicts", oft, ["oft_block_size"], config=setting(oft_block_size=size))
    peft("oft-r-contradicts", oft, ["adapter_config.json", "r"], config=setting(r=3, oft_block_size=0))
    peft("oft-block-size-negative", oft, ["adapter_config.json", "oft_block_size"],
         config=setting(oft_block_size=-8), validate_exit=2)
    peft("oft-eps-nan", oft, ["adapter_config.json", "eps"], config=setting(eps=float("nan"), coft=True),
         validate_exit=2)
    boft = FAMILIES / "peft-boft"
    peft("boft-factor-huge", boft, ["adapter_config.json", "boft_n_butterfly_factor"],
         config=setting(boft_n_butterfly_factor=10**6), validate_exit=2)
    peft("boft-factor-negative", boft, ["adapter_config.json", "boft_n_butterfly_factor"],
         config=setting(boft_n_butterfly_factor=-1), validate_exit=2)
    peft("boft-block-size-contradicts", boft, ["boft_block_size"], config=setting(boft_block_size=8))
    peft("boft-tensor-factors-huge", boft, [f"{P[17:]}self_attn.q_proj", "boft_R"],
         edit=put(f"{P}self_attn.q_proj.boft_R", lambda t: t.repeat(64, 1, 1, 1)))
    peft("boft-s-wrong-length", boft, [f"{P[17:]}self_attn.q_proj"],
         edit=put(f"{P}self_attn.q_proj.boft_s", lambda t: t[:20]), commands=PEFT_BASE_ONLY)

    # -- (IA)³ vectors of the wrong length or rank --------------------------------------------------------------
    ia3 = FAMILIES / "peft-ia3"
    peft("ia3-output-short", ia3, [f"{P[17:]}self_attn.k_proj"],
         edit=put(f"{P}self_attn.k_proj.ia3_l", lambda t: t[:12]), commands=PEFT_BASE_ONLY)
    peft("ia3-input-long", ia3, [f"{P[17:]}mlp.down_proj"],
         edit=put(f"{P}mlp.down_proj.ia3_l", lambda t: t.repeat(1, 2)), commands=PEFT_BASE_ONLY)
    peft("ia3-0d", ia3, [f"{P[17:]}self_attn.v_proj", "ia3_l"],
         edit=put(f"{P}self_attn.v_proj.ia3_l", lambda t: t[0, 0]))
    peft("ia3-matrix", ia3, [f"{P[17:]}self_attn.v_proj", "ia3_l"],
         edit=put(f"{P}self_attn.v_proj.ia3_l", lambda t: t.repeat(1, 4)))

    # -- target_modules / feedforward_modules of the wrong type (internal errors before) -------------------------
    for seed, tag in ((ia3, "ia3"), (FAMILIES / "peft-loha", "loha"), (FIXTURES / "peft" / "llama-lora", "lora")):
        peft(f"target-modules-int-{tag}", seed, ["adapter_config.json", "target_modules"],
             config=setting(target_modules=5), validate_exit=2)
    peft("target-modules-int-list", ia3, ["adapter_config.json", "target_modules"],
         config=setting(target_modules=[1, 2]), validate_exit=2)
    peft("feedforward-modules-int", ia3, ["adapter_config.json", "feedforward_modules"],
         config=setting(feedforward_modules=5), validate_exit=2)
    peft("feedforward-modules-object", ia3, ["adapter_config.json", "feedforward_modules"],
         config=setting(feedforward_modules={"down_proj": 1}), validate_exit=2)

    # -- PEFT flags that are not booleans and a null r / lora_alpha (read as true / as 8 before; probe4)
    lora = FIXTURES / "peft" / "llama-lora"
    for key, value in (("use_rslora", "yes"), ("use_dora", 1), ("fan_in_fan_out", "no"), ("lora_bias", "false")):
        peft(f"flag-{key}-not-bool", lora, ["adapter_config.json", key], config=setting(**{key: value}),
             validate_exit=2)
    for key, value in (("rank_pattern", {"[": 4}), ("alpha_pattern", {"q_proj(": 2}), ("target_modules", "(q|v")):
        peft(f"lora-{key}-bad-regex", lora, ["adapter_config.json", key, "regex"], config=setting(**{key: value}),
             validate_exit=2)  # the rank/alpha ones named no file before
    # use_dora without magnitude vectors: PEFT starts them at |W| (merged as plain LoRA before)
    peft("lora-use-dora-no-magnitudes", lora, ["use_dora", "lora_magnitude_vector"], config=setting(use_dora=True))
    for tag, change in (("r-0", {"r": 0}), ("r-negative", {"r": -4}), ("r-fraction", {"r": 2.5}),
                        ("rank-pattern-0", {"rank_pattern": {"q_proj": 0}})):  # info read them (probe4)
        peft(f"lora-{tag}", lora, ["adapter_config.json", "positive integer"], config=setting(**change),
             validate_exit=2)
    # a modules_to_save copy stored as int32: merged into the base as integers before (probe4)
    peft("lora-saved-module-int", FIXTURES / "peft" / "llama-mts", ["lm_head.weight", "int32", "floating point"],
         edit=put("base_model.model.lm_head.weight", lambda t: (t * 100).to(torch.int32)))
    for key in ("r", "lora_alpha"):
        peft(f"lora-{key}-null", lora, ["adapter_config.json", key], config=setting(**{key: None}), validate_exit=2)

    # -- a family adapter merged into a GGUF base: no B·A pair to merge (AttributeError 'factors' before; probe4)
    gguf = {"merge": ["merge", FIXTURES / "gguf" / "llama-f32.gguf", "A", "-o", "O"]}
    for tag, label in (("oft", "OFT"), ("boft", "BOFT"), ("ia3", "(IA)³"), ("loha", "LoHa")):
        build = peft_folder(FAMILIES / f"peft-{tag}", f"hostile-gguf-{tag}")
        expect = [f"{label} modules have no place in a GGUF LoRA"]
        cases.append(HostileCase(f"families-gguf-base-{tag}", build, expect, gguf, name_in_error=False))
    return cases


def _kohya_lora(alpha: float) -> Edit:
    """A plain kohya LoRA module beside the LyCORIS ones, with a non-finite alpha."""

    def edit(t: dict[str, torch.Tensor]) -> None:
        g = torch.Generator().manual_seed(0)
        t["lora_unet_x.lora_down.weight"] = torch.randn(2, 12, generator=g)
        t["lora_unet_x.lora_up.weight"] = torch.randn(16, 2, generator=g)
        t["lora_unet_x.alpha"] = torch.tensor(alpha)

    return edit


def _empty_loha(mod: str) -> Edit:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for part in ("hada_w1_a", "hada_w2_a"):
            t[f"{mod}.{part}"] = t[f"{mod}.{part}"][:, :0]
        for part in ("hada_w1_b", "hada_w2_b"):
            t[f"{mod}.{part}"] = t[f"{mod}.{part}"][:0]

    return edit


CASES = _cases()
__all__ = ["CASES", "LYCORIS_COMMANDS", "LLAMA_BASE"]
