"""Hostile expert adapters (formats/peft/experts.py, expert_write.py, vllm_moe.py): a good PEFT
``target_parameters`` adapter for a tiny Qwen3-MoE (4 experts, r=2, both expert parameters) built by PEFT itself
in the case's folder, or its per-expert ``vllm-moe`` form written by loratools, then one field or tensor broken.
Every case is refused when read, so the Llama base of the shared commands does not matter. The cases that need
the MoE base itself (a wrong expert count, rank_pattern against the base's count) stay in tests/moe; GGUF MoE
bases that do not fit the fixture adapter (expert count, expert shape, not stacked) and gpt-oss GGUF bases against
the gpt-oss fixture adapter (expert count, a NaN in an f32 expert or an MXFP4 scale), and DeepSeek-V3 GGUF bases
against a PEFT adapter built once per process (expert count, a kv_b split of another rank, NaN in a shared expert
or an attn_k_b head) are the last cases."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hostile import ADAPTER_COMMANDS, HostileCase

from loratools.files.safetensors_file import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moe"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
A0 = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"  # down_proj of layer 0 (the outer wrapper)
B0 = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"
GATE0 = "base_model.model.model.layers.0.mlp.experts.3.gate_proj.lora_A.weight"
QWEN3_MOE_LORA = Path(__file__).resolve().parents[2] / "fixtures" / "moe" / "qwen3-moe-lora"
GPT_OSS_LORA = Path(__file__).resolve().parents[2] / "fixtures" / "moe" / "gpt-oss-lora"


def _seed(folder: Path, served: bool = False) -> Path:
    import warnings

    from moe_support import build_moe, moe_peft

    out = folder / "moe-lora"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe_peft(build_moe("qwen3_moe"), out)
    if served:
        from loratools import load_adapter, save_adapter

        save_adapter(load_adapter(out), folder / "moe-served", format="vllm-moe")
        return folder / "moe-served"
    return out


def _config(edit: Callable[[dict[str, Any]], None], served: bool = False) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        out = _seed(folder, served)
        cfg = json.loads((out / CONFIG).read_text())
        edit(cfg)
        (out / CONFIG).write_text(json.dumps(cfg))
        return out

    return build


def _tensors(edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None], served: bool = False) -> Callable:
    def build(folder: Path) -> Path:
        out = _seed(folder, served)
        tensors, meta = load_file(out / WEIGHTS)
        tensors = {k: v.clone() for k, v in tensors.items()}
        edit(tensors, meta)
        save_file(tensors, str(out / WEIGHTS), metadata=meta)
        return out

    return build


def _set(key: str, index: tuple[int, int], value: float) -> Callable:
    def edit(t: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        t[key][index] = value

    return edit


def _record(edit: Callable[[dict[str, Any]], Any]) -> Callable:
    def change(t: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        rec = json.loads(meta["loratools.experts"])
        edit(rec)
        meta["loratools.experts"] = json.dumps(rec)

    return change


def _case(name: str, build: Callable[[Path], Path], expect: tuple[str, ...], validate_exit: int = 2) -> HostileCase:
    """validate_exit 1: validate reports the problem as one finding (an 'invalid' or structural line)"""
    return HostileCase(f"moe-{name}", build, expect, validate_exit=validate_exit)


def _drop_version(c: dict[str, Any]) -> None:
    c.pop("peft_version", None)


def _gguf_base(**kw: Any) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from moe_gguf import write_moe_gguf

        return write_moe_gguf(folder / "moe.gguf", **kw)

    return build


def _gpt_oss_base(**kw: Any) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from moe_gguf import write_gpt_oss_gguf

        return write_gpt_oss_gguf(folder / "gpt-oss.gguf", **kw)

    return build


#: the DeepSeek cases' adapter and Hugging Face model (a PEFT adapter has no committed fixture here): built once
#: per test process by moe_gguf.build_deepseek, removed at exit; each case's GGUF base is built in its own folder
DEEPSEEK = Path(tempfile.gettempdir()) / f"loratools-hostile-deepseek-{os.getpid()}"


def _deepseek_base(**kw: Any) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        import warnings

        from moe_gguf import build_deepseek, write_deepseek_gguf

        if not (DEEPSEEK / "lora" / CONFIG).is_file():
            atexit.register(shutil.rmtree, DEEPSEEK, True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_deepseek(DEEPSEEK)
        return write_deepseek_gguf(DEEPSEEK / "base", folder / "deepseek.gguf", **kw)

    return build


CASES = [
    _case("rows-not-divisible", _config(lambda c: c.update(r=3)), ("not a multiple of the rank 3", A0), 1),
    _case("r-not-integer", _config(lambda c: c.update(r=2.5)), ("r must be a positive integer", CONFIG)),
    _case(
        "rank-pattern-contradicts",
        _config(lambda c: c.update(rank_pattern={"layers.0.mlp.experts.down_proj": 4})),
        ("rank_pattern", "layers.0.mlp.experts"),
        1,
    ),
    _case("nan-in-B", _tensors(_set(B0, (3, 6), float("nan"))), ("NaN/Inf", B0, "expert 2 of"), 1),
    _case("inf-in-A", _tensors(_set(A0, (5, 0), float("inf"))), ("NaN/Inf", A0, "expert 2 of"), 1),
    _case(
        "bare-target-name",
        _config(lambda c: c.update(target_parameters=["gate_up_proj", "down_proj"])),
        ("'gate_up_proj'", "no module", CONFIG),
    ),
    _case(
        "target-not-listed",
        _config(lambda c: c.update(target_parameters=["mlp.experts.down_proj"])),
        ("2 nested LoRA wrapper", "down_proj", CONFIG),
    ),
    _case(
        "target-parameters-not-a-list",
        _config(lambda c: c.update(target_parameters="mlp.experts.gate_up_proj")),
        ("target_parameters must be a list", CONFIG),
    ),
    _case(
        "bias-on-wrapper",
        _tensors(lambda t, m: t.update({B0.replace(".weight", ".bias"): torch.ones(32)})),
        ("exactly lora_A and lora_B", "experts.down_proj"),
    ),
    _case(
        "orphan-nested-wrapper",
        _tensors(
            lambda t, m: t.update(
                {
                    "base_model.model.model.layers.0.self_attn.q_proj.base_layer.lora_A.weight": torch.ones(2, 32),
                    "base_model.model.model.layers.0.self_attn.q_proj.base_layer.lora_B.weight": torch.ones(32, 2),
                }
            )
        ),
        ("nested LoRA wrapper", "self_attn.q_proj"),
    ),
    HostileCase(  # validate's structural finding names the module, its header line the folder
        "moe-B-columns-not-A-rows",
        _tensors(lambda t, m: t.update({B0: t[B0][:, :6].contiguous()})),
        ("lora_A has rank 8 but lora_B has rank 6",),
        commands={k: v for k, v in ADAPTER_COMMANDS.items() if not k.startswith("validate")},
    ),
    # what the writers' readers add: the B packing nobody declared, a bad declaration, the vllm-moe record
    _case("packing-undeclared", _config(_drop_version), ("expert_lora_b_layout", "blocked", CONFIG)),
    _case(
        "packing-bad-value",
        _config(lambda c: (_drop_version(c), c.update(expert_lora_b_layout="diagonal"))),
        ("expert_lora_b_layout must be", "'diagonal'", CONFIG),
    ),
    _case(
        "served-count-not-int",
        _tensors(_record(lambda r: r["num_experts"].update({"model.layers.0.mlp.experts.down_proj": "4"})), True),
        ("loratools.experts", "num_experts", WEIGHTS),
    ),
    _case(
        "served-count-too-small",
        _tensors(_record(lambda r: r["num_experts"].update({"model.layers.0.mlp.experts.gate_up_proj": 2})), True),
        ("expert 2", "model.layers.0.mlp.experts.gate_up_proj", "holds 2 experts", WEIGHTS),
        1,
    ),
    _case(
        "served-gate-width",
        _tensors(lambda t, m: t.update({GATE0: t[GATE0][:, :16].contiguous()}), True),
        ("expert 3", "disagree", WEIGHTS),
    ),
    # GGUF MoE bases (tests/moe_gguf.py) that do not fit the fixture's 4 experts of (24, 32) / (32, 24)
    *(
        HostileCase(
            f"moe-gguf-base-{name}",
            _gguf_base(**kw),
            expect,
            commands={"merge": ["merge", "B", QWEN3_MOE_LORA, "-o", "O"]},
        )  # fmt: skip
        for name, kw, expect in (
            (
                "too-few-experts",
                {"experts": 3},
                ("the adapter holds 4 experts", "blk.0.ffn_down_exps.weight [3, 32, 24]"),
            ),
            ("narrow-experts", {"ffn": 16}, ("blk.0.ffn_down_exps.weight holds experts of [32, 16]",)),
            ("not-stacked", {"flat": True}, ("blk.0.ffn_down_exps.weight [128, 24] is not a stack of experts",)),
        )
    ),
    # gpt-oss GGUF bases (tests/moe_gguf.py, the converter's layout) against the gpt-oss fixture adapter
    *(
        HostileCase(
            f"moe-gguf-gpt-oss-{name}",
            _gpt_oss_base(**kw),
            expect,
            commands={"merge": ["merge", "B", GPT_OSS_LORA, "-o", "O"]},
        )  # fmt: skip
        for name, kw, expect in (
            (
                "too-few-experts",
                {"experts": 3},
                ("the adapter holds 4 experts", "blk.0.ffn_down_exps.weight [3, 32, 32]"),
            ),
            ("nan-in-f32-expert", {"nan_expert": 2}, ("base tensor blk.0.ffn_gate_exps.weight[2] holds NaN",)),
            (
                "nan-mxfp4-scale",
                {"outtype": "mxfp4", "nan_expert": 1},
                ("base tensor blk.0.ffn_gate_exps.weight[1] holds NaN",),
            ),
        )
    ),
    # an adapter of the other expert layout: (out, in) Qwen3-MoE experts into gpt-oss, (in, out) gpt-oss into Qwen3-MoE
    HostileCase(
        "moe-gguf-gpt-oss-qwen-adapter",
        _gpt_oss_base(),
        ("stores experts (out, in)", "a gpt-oss GGUF is converted from (in, out) experts"),
        commands={"merge": ["merge", "B", QWEN3_MOE_LORA, "-o", "O"]},
    ),
    HostileCase(
        "moe-gguf-qwen-gpt-oss-adapter",
        _gguf_base(),
        ("stores experts (in, out)", "a qwen3moe GGUF is converted from (out, in) experts"),
        commands={"merge": ["merge", "B", GPT_OSS_LORA, "-o", "O"]},
    ),
    # DeepSeek-V3 GGUF bases (moe_gguf.write_deepseek_gguf, the converter's layout) that do not fit its adapter
    *(
        HostileCase(
            f"moe-gguf-deepseek-{name}",
            _deepseek_base(**kw),
            expect,
            commands={"merge": ["merge", "B", DEEPSEEK / "lora", "-o", "O"]},
        )  # fmt: skip
        for name, kw, expect in (
            (
                "too-few-experts",
                {"experts": 3},
                ("the adapter holds 4 experts", "blk.1.ffn_down_exps.weight [3, 64, 32]"),
            ),
            (
                "kv-b-other-rank",
                {"kv_rank": 16},
                ("kv_b_proj", "blk.0.attn_k_b.weight [4, 16, 16]", "split a kv_b_proj of [128, 16]"),
            ),
            ("nan-shared-expert", {"nan": "blk.1.ffn_gate_shexp.weight"}, ("blk.1.ffn_gate_shexp.weight holds NaN",)),
            ("nan-k-b", {"nan": "blk.1.attn_k_b.weight"}, ("base tensor blk.1.attn_k_b.weight[0] holds NaN",)),
        )
    ),
]
