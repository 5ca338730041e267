"""A seeded fuzzer over adapter-family tensors and configs (issue 19 §3): LyCORIS and PEFT family files written by
lycoris-lora and PEFT, one to three tensors reshaped, recast or poisoned (NaN/Inf) and config values replaced;
``load_adapter``, ``validate`` and each module's merge into its base weight may only end in a result or a
:class:`~loratools.errors.LoratoolsError` — never another exception."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from reliability_support import FIXTURES, LLAMA_BASE

from loratools.errors import LoratoolsError

FAMILIES = FIXTURES / "families"
SEEDS = sorted(p.name for p in FAMILIES.glob("lycoris-*.safetensors")) + sorted(
    p.name for p in FAMILIES.glob("peft-*")
)
CONFIG_VALUES = (-1, 0, 1, 3, 7, 16, 10**9, 2.5, float("nan"), "5", None, True, [1], {"a": 1})
CONFIG_KEYS = ("r", "alpha", "oft_block_size", "num_cayley_neumann_terms", "boft_block_size", "boft_block_num",
               "boft_n_butterfly_factor", "eps", "target_modules", "feedforward_modules", "rank_pattern", "block_share")
DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8)


def _mutate_tensor(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    kind = rng.randrange(7)
    if kind == 0 and t.ndim:  # drop a dimension
        return t.reshape(-1) if t.ndim > 1 else t[0]
    if kind == 1:  # add one
        return t.unsqueeze(rng.randrange(t.ndim + 1))
    if kind == 2 and t.ndim:  # shrink or grow one dimension (to 0 sometimes)
        d = rng.randrange(t.ndim)
        n = rng.choice((0, 1, max(1, t.shape[d] - 1), t.shape[d] + 1, 2 * t.shape[d]))
        idx = torch.arange(n) % max(1, t.shape[d])
        return t.index_select(d, idx) if t.shape[d] else t
    if kind == 3:
        return t.to(rng.choice(DTYPES))
    if kind == 4 and t.numel():
        flat = t.clone().reshape(-1)
        flat[rng.randrange(flat.numel())] = rng.choice((float("nan"), float("inf"), -float("inf"), 1e38))
        return flat.reshape(t.shape)
    if kind == 5 and t.ndim >= 2:
        return t.transpose(0, 1).contiguous()
    return t * rng.choice((0.0, -1.0, 1e30))


def _build(seed_name: str, rng: random.Random, tmp: Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = FAMILIES / seed_name
    if src.is_file():
        dst, st = tmp / "fuzz.safetensors", src
    else:
        dst = tmp / "fuzz"
        shutil.copytree(src, dst)
        st = dst / "adapter_model.safetensors"
        if rng.random() < 0.5:
            cfg_path = dst / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg[rng.choice(CONFIG_KEYS)] = rng.choice(CONFIG_VALUES)
            cfg_path.write_text(json.dumps(cfg))
    tensors = load_file(str(st))
    with safe_open(str(st), "pt") as f:
        meta = f.metadata()
    for key in rng.sample(sorted(tensors), k=rng.randint(1, 3)):
        tensors[key] = _mutate_tensor(tensors[key], rng).contiguous()
    save_file(tensors, str(dst if src.is_file() else st), metadata=meta)
    return dst


def _exercise(path: Path, base: Path) -> None:
    from loratools import load_adapter
    from loratools.checkpoint.reader import open_checkpoint
    from loratools.ops.validate import validate

    validate(path)  # never raises: problems are findings
    validate(path, base=base)
    try:
        adapter = load_adapter(path, base=base)
    except LoratoolsError:
        return
    reader = open_checkpoint(base)
    try:
        for name, m in adapter.modules.items():
            key = f"{name}.weight"
            if key not in reader.keys() or not hasattr(m, "misfit"):
                continue
            w = reader.get(key).float()
            if m.misfit(tuple(w.shape)) is None:
                try:
                    m.merged(w) if m.needs_base else m.delta(w)
                except LoratoolsError:
                    pass
    finally:
        reader.close()


@pytest.mark.parametrize("chunk", range(4))
def test_family_fuzz_only_loratools_errors_escape(chunk: int, tmp_path: Path) -> None:
    """300 seeded mutants (75 per chunk) over the 14 family fixtures."""
    for seed in range(chunk * 75, chunk * 75 + 75):
        rng = random.Random(seed)
        seed_name = SEEDS[seed % len(SEEDS)]
        folder = tmp_path / str(seed)
        folder.mkdir()
        path = _build(seed_name, rng, folder)
        base = FAMILIES / "tiny-unet" if seed_name.startswith("lycoris") else LLAMA_BASE
        try:
            _exercise(path, base)
        except LoratoolsError:
            pass
        except Exception as exc:  # noqa: BLE001 - the assertion this test makes
            raise AssertionError(f"seed {seed} ({seed_name}): {type(exc).__name__}: {exc}") from exc
        shutil.rmtree(folder)
