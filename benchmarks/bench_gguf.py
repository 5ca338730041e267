"""Benchmark: merging into a ~1 GB GGUF base (F16 and Q8_0), side by side with the safetensors merge of the
same model and with the route users take today, in one run.

Reuses bench_merge.py's 1.08 GB bf16 Llama-shaped checkpoint (8 layers) and rank-16 all-linear PEFT adapter
in /tmp/loratools-bench, gives the checkpoint a small SentencePiece tokenizer (llama.cpp's converter wants
one), and converts it to GGUF F16 and Q8_0 — with llama.cpp's own ``convert_hf_to_gguf.py`` when
``--llama-cpp`` is given, else with the ``gguf`` package (names by ``get_tensor_name_map``, Q/K rows
permuted as the converter does). Then it times whole processes (imports included) with
``/usr/bin/time -v``, every tool once per round, rounds rotated, and prints a markdown table of medians:

- ``loratools merge BASE.gguf ADAPTER`` and the same with ``--verify``;
- the same two from ``--baseline SRC`` (another loratools source tree, e.g. ``git archive`` of an older
  commit, put first on PYTHONPATH): before/after numbers from the same run;
- ``PEFT + convert_hf_to_gguf.py``: PEFT ``merge_and_unload`` + ``save_pretrained`` (this interpreter),
  then llama.cpp's converter with ``--outtype f16|q8_0`` (``--convert-python``: a venv holding what it
  pins, transformers 4.57.6 etc.); wall times added, peak RSS the larger of the two;
- ``loratools convert ADAPTER --to gguf --base BASE.gguf``;
- ``loratools merge`` into the safetensors checkpoint itself, ``cp`` of each base as the floor.

    python benchmarks/bench_gguf.py [--runs 3] [--llama-cpp DIR --convert-python PY] [--baseline SRC]

llama.cpp's converter ships in the ``llama-cpp-python==0.3.36`` sdist (``vendor/llama.cpp``; see
``../shared/tools/llama_cpp_runtime/README.md``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import HEADS, PEFT_SCRIPT, ROOT, build_adapter, build_base, config, timed  # noqa: E402

LAYERS = 8
TYPES = ("f16", "q8_0")
#: bench_merge's PEFT merge, then the base's tokenizer beside the merged weights (the converter needs it)
PEFT_AND_TOKENIZER = PEFT_SCRIPT + "import shutil; shutil.copy(sys.argv[1] + '/tokenizer.model', sys.argv[3])\n"


def permute(w, n_head: int):  # noqa: ANN001, ANN201 - LlamaModel.permute's formula (here Q and K have 16 heads)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tokenizer(hf: Path) -> None:
    """A 400-piece SentencePiece BPE model (byte fallback) as ``tokenizer.model``; the converter pads the
    vocabulary to the config's 32000 with [PAD] tokens."""
    import io
    import random

    import sentencepiece as spm

    if (hf / "tokenizer.model").is_file():
        return
    rnd = random.Random(0)
    words = "the model adapter merge layer weight token rank alpha tensor file lora llama quick brown fox".split()
    text = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        minloglevel=2,
    )  # fmt: skip
    (hf / "tokenizer.model").write_bytes(buf.getvalue())


def build_gguf(hf: Path, out: Path, outtype: str) -> None:
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    if out.is_file():
        return
    cfg = config(LAYERS)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    w = gguf.GGUFWriter(out, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(2048)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(HEADS)
    w.add_head_count_kv(cfg.get("num_key_value_heads", HEADS))
    w.add_layer_norm_rms_eps(1e-6)
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                t = st.get_tensor(key).to(torch.float32).numpy()
                if key.endswith(("q_proj.weight", "k_proj.weight")):
                    t = permute(t, HEADS)
                name = tmap.get_name(key, try_suffixes=(".weight",))
                if outtype == "q8_0" and t.ndim == 2:
                    q8 = gguf.GGMLQuantizationType.Q8_0
                    w.add_tensor(name, gguf.quants.quantize(t, q8), raw_dtype=q8)
                else:
                    w.add_tensor(name, t.astype(np.float16) if t.ndim == 2 else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def convert_cmd(args: argparse.Namespace, hf: Path, outtype: str, out: Path) -> list[str]:
    script = str(Path(args.llama_cpp) / "convert_hf_to_gguf.py")
    return [args.convert_python, script, str(hf), "--outtype", outtype, "--outfile", str(out)]


def build_bases(args: argparse.Namespace, hf: Path) -> dict[str, Path]:
    bases = {}
    for t in TYPES:
        if args.llama_cpp:
            bases[t] = ROOT / f"conv-{LAYERS}-{t}.gguf"
            if not bases[t].is_file():
                timed(convert_cmd(args, hf, t, bases[t]))
        else:
            bases[t] = ROOT / f"base-{LAYERS}-{t}.gguf"
            build_gguf(hf, bases[t], t)
    return bases


def cases(args: argparse.Namespace, hf: Path, adapter: Path, bases: dict[str, Path]) -> dict[tuple[str, str], list]:
    """(base, tool) -> the commands a run of it takes (several: times added, RSS the largest)."""
    lt = [sys.executable, "-m", "loratools"]
    size = f"{sum(f.stat().st_size for f in hf.glob('*.safetensors')) / 1e9:.2f} GB BF16"
    out: dict[tuple[str, str], list] = {
        (f"{size} safetensors", "loratools merge"): [[*lt, "merge", str(hf), str(adapter), "-o", str(ROOT / "m-st")]],
        (f"{size} safetensors", "cp -r (floor)"): [["cp", "-r", str(hf), str(ROOT / "copy-st")]],
    }
    for t, base in bases.items():
        label = f"{base.stat().st_size / 1e9:.2f} GB {t.upper()}"
        merge = [*lt, "merge", str(base), str(adapter), "-o", str(ROOT / f"m-{t}.gguf"), "--overwrite"]
        out[(label, "loratools merge")] = [merge]
        out[(label, "loratools merge --verify")] = [[*merge, "--verify"]]
        if args.baseline:  # -P: the working directory (this checkout) does not come before PYTHONPATH
            old = ["env", f"PYTHONPATH={Path(args.baseline).resolve()}", sys.executable, "-P", *merge[1:]]
            out[(label, "loratools merge (baseline)")] = [old]
            out[(label, "loratools merge --verify (baseline)")] = [[*old, "--verify"]]
        if args.llama_cpp:
            merged = ROOT / "peft-merged"
            peft = [sys.executable, "-c", PEFT_AND_TOKENIZER, str(hf), str(adapter), str(merged)]
            out[(label, "PEFT + convert_hf_to_gguf.py")] = [peft, convert_cmd(args, merged, t, ROOT / f"p-{t}.gguf")]
        convert = [*lt, "convert", str(adapter), "--to", "gguf", "--base", str(base), "-o", str(ROOT / f"a-{t}.gguf")]
        out[(label, "loratools convert --to gguf")] = [[*convert, "--overwrite"]]
        out[(label, "cp (floor)")] = [["cp", str(base), str(ROOT / f"copy-{t}.gguf")]]
    return out


def run_case(cmds: list[list[str]]) -> tuple[float, float]:
    for p in (ROOT / "m-st", ROOT / "copy-st", ROOT / "peft-merged"):
        shutil.rmtree(p, ignore_errors=True)
    results = [timed(cmd) for cmd in cmds]
    return sum(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama-cpp", help="llama.cpp source folder holding convert_hf_to_gguf.py")
    ap.add_argument("--convert-python", default=sys.executable, help="the interpreter to run the converter with")
    ap.add_argument("--baseline", help="another loratools source tree to time beside this one")
    args = ap.parse_args()
    hf, adapter = ROOT / f"base-{LAYERS}", ROOT / f"adapter-{LAYERS}"
    build_base(hf, LAYERS)
    build_adapter(adapter, LAYERS)
    build_tokenizer(hf)
    bases = build_bases(args, hf)
    todo = cases(args, hf, adapter, bases)
    results: dict = {k: [] for k in todo}
    keys = list(todo)
    loads = [os.getloadavg()[0]]
    for i in range(args.runs):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:  # rotated: no tool always runs first
            results[k].append(run_case(todo[k]))
            print(f"{k[0]}, {k[1]}: {results[k][-1][0]:.2f} s, {results[k][-1][1]:.0f} MB", flush=True)
        loads.append(os.getloadavg()[0])
    print(f"\nload average (1 min) at the start and after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"{os.cpu_count()} CPUs; medians of {args.runs} runs, (min–max) wall time\n")
    print("| base | tool | wall time (s) | peak RSS (MB) |")
    print("|---|---|---:|---:|")
    med = {}
    for (base, tool), runs in results.items():
        walls = [r[0] for r in runs]
        med[(base, tool)] = statistics.median(walls)
        rss = statistics.median(r[1] for r in runs)
        print(f"| {base} | {tool} | {med[(base, tool)]:.2f} ({min(walls):.2f}–{max(walls):.2f}) | {rss:.0f} |")
    st = next(v for (b, t), v in med.items() if b.endswith("safetensors") and t == "loratools merge")
    print()
    for (base, tool), v in med.items():
        if tool == "loratools merge" and not base.endswith("safetensors"):
            line = f"{base}: loratools merge = {v / st:.2f}× the safetensors merge"
            route = med.get((base, "PEFT + convert_hf_to_gguf.py"))
            if route:
                line += f"; PEFT + convert_hf_to_gguf.py is {route / v:.1f}× slower"
            line += f"; --verify adds {med[(base, 'loratools merge --verify')] - v:.2f} s"
            print(line)


if __name__ == "__main__":
    main()
