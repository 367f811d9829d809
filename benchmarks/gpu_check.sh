#!/usr/bin/env bash
# GPU check of torchcame's Triton kernels (issue #13). Run on a machine with a CUDA GPU, from
# any directory, in an environment where torchcame (this checkout), torch with CUDA and
# triton are installed (`pip install -e ".[dev]"`):
#
#     bash benchmarks/gpu_check.sh            # results under benchmarks/results/gpu/
#     OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# It writes, under $OUT:
#   device.json            GPU, driver, torch/triton versions, measured copy bandwidth
#   test_triton.log        tests/test_triton.py on CUDA tensors (compiled kernels, no
#                          interpreter): parity with the reference, low-bit formats, stochastic
#                          rounding, CPU-kernel checkpoint interchange, launch counts
#   triton_bandwidth.json  step time of the Triton step itself per parameter set and
#   triton_bandwidth.log   configuration, its achieved GB/s (bytes from traffic_bytes) against
#                          the device's copy bandwidth, and fused AdamW's on the same shapes
#   sharded_kernel_check.json/.log  DTensor parameters (Shard(0) on a 1-rank nccl mesh) with
#                          fused=True: the phase-split Triton launches of the sharded path
#                          against the single-process Triton step
#   bench.json/.png/.log   `torchcame bench --device cuda` (every candidate it knows)
# Commit $OUT with the commit of the code it measured (written into device.json).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
unset TRITON_INTERPRET TORCHCAME_FUSED_BACKEND
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

python - "$OUT" <<'EOF'
import json, subprocess, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: CUDA is not available (torch.cuda.is_available() is False)")
import triton
props = torch.cuda.get_device_properties(0)
x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")  # 1 GiB
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    y.copy_(x)
end.record()
torch.cuda.synchronize()
copy_gbs = 10 * 2 * x.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e9
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
info = {"device": props.name, "capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "copy_bandwidth_gbs": round(copy_gbs, 1), "commit": commit.strip()}
json.dump(info, open(f"{sys.argv[1]}/device.json", "w"), indent=1)
print(json.dumps(info, indent=1))
EOF

echo "== tests/test_triton.py on CUDA"
python -m pytest -q tests/test_triton.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/test_triton.log"

echo "== Triton step: achieved bandwidth"
python - "$OUT" <<'EOF' 2>&1 | tee "$OUT/triton_bandwidth.log"
import json, sys
import torch
from torchcame._factored import factored_dims
from torchcame._impl import triton_kernels as tk
from torchcame.options import StepArgs
from torchcame.bench.shapes import param_shapes
from torchcame.functional import init_state
from torchcame.state import StateLayout

out = sys.argv[1]
copy_gbs = json.load(open(f"{out}/device.json"))["copy_bandwidth_gbs"]
dev = torch.device("cuda")
CONFIGS = {  # name: (param dtype, momentum, stochastic rounding)
    "fp32 params, fp32 momentum": (torch.float32, "float32", False),
    "bf16 params, bf16 momentum": (torch.bfloat16, "bfloat16", False),
    "bf16 params, int8 momentum, SR": (torch.bfloat16, "int8", True),
}


def timed(fn, steps=20, warmup=3):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


rows = []
for set_name in ("gpt2-124m", "vit-b16", "big-matrix"):
    shapes = param_shapes(set_name)
    numel = sum(torch.Size(s).numel() for s in shapes)
    # fused AdamW, float32: p r/w, g r, m r/w, v r/w = 28 bytes per element
    ps = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(ps, lr=1e-4, fused=True)
    t_adamw = timed(adamw.step)
    del adamw, ps
    for name, (dtype, momentum, sr) in CONFIGS.items():
        params = [torch.randn(s, device=dev).to(dtype) for s in shapes]
        grads = [torch.randn(s, device=dev).to(dtype) for s in shapes]
        states, layouts = [], []
        for p in params:
            states.append(init_state(p, momentum_dtype=momentum))
            quantized = momentum == "int8" and p.dim() >= 2 and p.numel() >= 4096
            stored = momentum if momentum != "int8" or quantized else "float32"
            layouts.append(StateLayout(stored, 256, factored_dims(p.shape), torch.float32))
        args = StepArgs(lr=torch.tensor(1e-4, device=dev), betas=(0.9, 0.999, 0.9999),
                        eps=(1e-30, 1e-16), clip_threshold=1.0, weight_decay=0.01,
                        stochastic_rounding=sr)
        launches = sum(tk.LAUNCHES.values())
        t = timed(lambda: tk.step_triton(params, grads, states, args, layouts))  # noqa: B023
        launches = (sum(tk.LAUNCHES.values()) - launches) / 23
        traffic = sum(tk.traffic_bytes(p.numel(), p.dtype, g.dtype, lay.momentum,
                                       lay.factored) for p, g, lay in zip(params, grads, layouts))
        row = {"set": set_name, "config": name, "params": numel, "step_ms": t * 1e3,
               "launches_per_step": launches, "bytes_per_param": traffic / numel,
               "achieved_gbs": traffic / t / 1e9, "x_copy_bandwidth": traffic / t / 1e9 / copy_gbs,
               "adamw_fused_ms": t_adamw * 1e3,
               "adamw_fused_gbs": 28 * numel / t_adamw / 1e9,
               "x_adamw_fused_time": t / t_adamw}
        rows.append(row)
        print(f"{set_name:10s} {name:32s} {t * 1e3:8.3f} ms  {row['achieved_gbs']:7.1f} GB/s "
              f"({row['x_copy_bandwidth']:.2f}x copy)  {row['bytes_per_param']:.2f} B/param  "
              f"x AdamW fused {row['x_adamw_fused_time']:.2f} (AdamW {row['adamw_fused_gbs']:.0f} "
              f"GB/s)  launches/step {launches:.0f}")
        del params, grads, states
json.dump({"copy_bandwidth_gbs": copy_gbs, "rows": rows}, open(f"{out}/triton_bandwidth.json", "w"),
          indent=1)
EOF

echo "== the sharded path (DTensor, fused=True) on the Triton kernels"
python benchmarks/sharded_kernel_check.py --device cuda --out "$OUT" 2>&1 \
    | tee "$OUT/sharded_kernel_check.log"

echo "== torchcame bench --device cuda"
python -m torchcame.cli bench --device cuda --no-progress --out "$OUT/bench.json" \
    --png "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log"
echo "gpu_check: done; results in $OUT"
