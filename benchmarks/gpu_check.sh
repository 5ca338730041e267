#!/usr/bin/env bash
# GPU check for the ONNX / merge paths, for a machine with a CUDA GPU and torch built with CUDA.
# Needs no network: it builds its own medium Llama-shaped model (fp16, ~0.3 GB) and a rank-16 adapter.
# Measures: fp16 export on cuda (torch.onnx), merge-into-ONNX of the fp16 export, the checkpoint merge
# with --device cuda vs cpu, and PyTorch eager merged vs unmerged (PEFT) latency on the GPU.
# The onnxruntime CUDAExecutionProvider path runs only when onnxruntime-gpu is installed; otherwise the
# script says so plainly (and the export is checked with onnxruntime on CPU in fp32 instead).
# Usage (from the repository root): bash benchmarks/gpu_check.sh [OUT_DIR]   (finishes in < 5 minutes)
set -euo pipefail
OUT="${1:-${OUT:-/tmp/loratools-gpu-check}}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" ORT_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 290 python - "$OUT" <<'PY' 2>&1 | tee "$OUT/gpu_check.log"
import json, os, shutil, statistics, sys, tempfile, time
from pathlib import Path

import torch

out = Path(sys.argv[1])
work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=out))
report = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
assert torch.cuda.is_available(), "no CUDA device visible to torch"
report["gpu"] = torch.cuda.get_device_name(0)
try:
    import onnxruntime as ort
    report["onnxruntime"] = ort.__version__
    report["ort_providers"] = ort.get_available_providers()
except ImportError:
    report["onnxruntime"] = None
    report["ort_providers"] = []
cuda_ep = "CUDAExecutionProvider" in report["ort_providers"]
report["cuda_execution_provider_ran"] = cuda_ep


def step(name):
    print(f"== {name}", flush=True)


# 1. a medium Llama-shaped model and a rank-16 all-linear PEFT adapter, made here
step("build model")
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8,
                  num_hidden_layers=4, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg).to(torch.float16).eval()
model.save_pretrained(work / "base")
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
try:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(work / "adapter")
    model = peft_model.unload()
    have_peft = True
except ImportError:
    from loratools.model.adapter import Adapter, LoraModule
    from loratools.io import save_adapter

    mods = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            mods[name] = LoraModule(down=torch.randn(16, m.in_features) * 0.02, up=torch.randn(m.out_features, 16) * 0.02,
                                    alpha=32.0)
    save_adapter(Adapter(mods), work / "adapter", format="peft")
    have_peft = False
report["peft"] = have_peft

# 2. fp16 export on cuda
step("fp16 export on cuda")
from loratools.onnx.export import export_onnx

t0 = time.perf_counter()
res = export_onnx(work / "base", work / "onnx-fp16", dtype="fp16", device="cuda", verify=cuda_ep)
report["export_fp16_cuda_seconds"] = round(time.perf_counter() - t0, 2)
report["export_fp16_verified_on_cuda_ep"] = res.max_diff
report["export_fp16_data_bytes"] = res.data_bytes

# 3. merge the adapter into the fp16 ONNX model (no export) vs exporting the merged model again
step("merge into ONNX")
from loratools.onnx.patch import merge_onnx

t0 = time.perf_counter()
merge_onnx(work / "onnx-fp16", [work / "adapter"], work / "onnx-fp16-merged")
report["merge_onnx_seconds"] = round(time.perf_counter() - t0, 3)
if report["onnxruntime"]:
    import numpy as np

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_ep else ["CPUExecutionProvider"]
    feed = {"input_ids": np.arange(1, 33, dtype=np.int64)[None], "attention_mask": np.ones((1, 32), dtype=np.int64)}
    try:
        a = ort.InferenceSession(str(work / "onnx-fp16/model.onnx"), providers=providers).run(None, feed)[0]
        b = ort.InferenceSession(str(work / "onnx-fp16-merged/model.onnx"), providers=providers).run(None, feed)[0]
        report["fp16_onnx_adapter_effect"] = float(np.abs(a.astype("f4") - b.astype("f4")).max())
        report["fp16_onnx_ran_on"] = providers[0]
    except Exception as exc:  # the CPU provider lacks some fp16 kernels
        report["fp16_onnx_run_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"

# 4. checkpoint merge on cuda vs cpu
step("checkpoint merge cuda vs cpu")
from loratools.ops.merge import merge

for device in ("cuda", "cpu"):
    t0 = time.perf_counter()
    merge(work / "base", [work / "adapter"], work / f"merged-{device}", device=device)
    report[f"merge_checkpoint_{device}_seconds"] = round(time.perf_counter() - t0, 3)
from loratools.files.safetensors_file import load_file

x, _ = load_file(next((work / "merged-cuda").glob("*.safetensors")))
y, _ = load_file(next((work / "merged-cpu").glob("*.safetensors")))
report["merge_cuda_vs_cpu_max_diff"] = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)

# 5. PyTorch eager latency on the GPU: merged vs unmerged (PEFT LoRA layers)
step("eager latency")


def latency(net, batch, seq, runs=30):
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    with torch.inference_mode():
        for _ in range(5):
            net(input_ids=ids)
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            net(input_ids=ids)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3)}


base = LlamaForCausalLM.from_pretrained(work / "base", dtype=torch.float16).cuda().eval()
shapes = [(1, 128), (8, 512)]
if have_peft:
    from peft import PeftModel

    unmerged = PeftModel.from_pretrained(base, work / "adapter").eval()
    report["eager_unmerged_peft"] = {f"{b}x{s}": latency(unmerged, b, s) for b, s in shapes}
    base = unmerged.unload()
merged = LlamaForCausalLM.from_pretrained(work / "merged-cuda", dtype=torch.float16).cuda().eval()
report["eager_merged"] = {f"{b}x{s}": latency(merged, b, s) for b, s in shapes}
report["eager_base"] = {f"{b}x{s}": latency(base, b, s) for b, s in shapes}

report["note"] = ("onnxruntime CUDAExecutionProvider path " + ("RAN" if cuda_ep else "was NOT run (onnxruntime-gpu is "
                  "not installed here); the fp16 export and merges ran on cuda with torch"))
print(json.dumps(report, indent=2))
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
shutil.rmtree(work, ignore_errors=True)
PY
