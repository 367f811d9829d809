"""The sharded path's Triton kernels on one device: DTensor parameters against plain ones.

``CAME(fused=True)`` on DTensor parameters (FSDP2, tensor parallel) runs the Triton kernels on
the local shards and reduces their sums across ranks between the passes
(:class:`torchcame.distributed._KernelGroup`). This check runs that path in one process: a
process group of one rank (nccl on CUDA, gloo on CPU), every parameter a ``Shard(0)`` DTensor
on a mesh of size 1, so each step goes through the phase-split launches and the (trivial)
all-reduces. The same parameters as plain tensors, stepped by the single-process Triton step,
are the yardstick; both must agree within ``1e-5`` of the size of the whole update (``1e-2``
with bf16/int8 momentum, where one rounding flip of a stored m is allowed; bf16 weights with
stochastic rounding: within one bf16 spacing of the weight).

    python benchmarks/sharded_kernel_check.py --device cuda --out benchmarks/results/gpu
    TRITON_INTERPRET=1 TORCHCAME_FUSED_BACKEND=triton python benchmarks/sharded_kernel_check.py

(The second form runs the kernels under Triton's interpreter on CPU tensors: slow, but the
same logic; ``bash benchmarks/gpu_check.sh`` runs the first.) Writes
``sharded_kernel_check.json`` under ``--out`` when given; exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = [(96, 80), (3, 40, 24), (33, 264), (300,), (7,)]  # dim-0 slices: whole int8 blocks
OPTIONS = {  # name: (options, tolerance over the update's size)
    "float32": ({}, 1e-5),
    # low-bit: a split sum can move one stored m across a rounding boundary (as in the
    # distributed tests, which allow 1e-2 after many steps)
    "bf16 momentum": ({"momentum_dtype": torch.bfloat16}, 1e-2),
    "int8 momentum": ({"momentum_dtype": "int8", "min_quantized_numel": 64,
                       "quantization_block_size": 8}, 1e-2),
    "bias correction, maximize": ({"bias_correction": True, "maximize": True}, 1e-5),
    # bf16 weights rounded stochastically: both paths draw the same Philox keys (one seed per
    # step from torch's generator, seeded alike), so they agree up to a rounding that lands
    # on the other neighbour where the float32 updates differ in the last bits: at most one
    # bf16 spacing, 2^-7 of the weight
    "bf16 params, stochastic rounding": ({"stochastic_rounding": True}, 2**-7),
}
BF16_OPTIONS = ("bf16 params, stochastic rounding",)
STEPS = 4


def _run(device: torch.device, sharded: bool, options: dict,
         dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from torchcame import CAME
    from torchcame._impl import triton_kernels as tk

    torch.manual_seed(0)  # the stochastic-rounding seeds
    gen = torch.Generator().manual_seed(0)
    initial = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(device) for s in SHAPES] for _ in range(STEPS)]
    mesh = init_device_mesh(device.type, (1,)) if sharded else None

    def place(t: torch.Tensor) -> torch.Tensor:
        return distribute_tensor(t, mesh, [Shard(0)]) if sharded else t

    params = [torch.nn.Parameter(place(p.clone())) for p in initial]
    opt = CAME(params, lr=1e-2, weight_decay=0.1, fused=True, **options)
    before = dict(tk.LAUNCHES)
    for step in range(STEPS):
        for p, g in zip(params, grads[step]):
            p.grad = place(g.to(dtype))
        opt.step()
    launches = {k: v - before.get(k, 0) for k, v in tk.LAUNCHES.items() if v != before.get(k, 0)}
    full = [p.detach().full_tensor() if sharded else p.detach() for p in params]
    return full, initial, launches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    store = tempfile.NamedTemporaryFile(delete=False)
    dist.init_process_group(backend, init_method=f"file://{store.name}", rank=0, world_size=1)
    rows, ok = [], True
    try:
        for name, (options, tolerance) in OPTIONS.items():
            dtype = torch.bfloat16 if name in BF16_OPTIONS else torch.float32
            plain, initial, _ = _run(device, False, options, dtype)
            sharded, _, launches = _run(device, True, options, dtype)
            errors = []
            for a, b, p0 in zip(sharded, plain, initial):
                # float32: over the size of the whole update; bf16: over the weight's size
                scale = (b.float() - p0.float() if dtype == torch.float32 else b.float())
                scale = scale.abs().max().item()
                errors.append((a.float() - b.float()).abs().max().item() / scale
                              if scale else 0.0)
            kernels = launches.get("pass1", 0) >= STEPS and "stat_ema" not in launches
            passed = max(errors) <= tolerance and kernels
            ok &= passed
            rows.append({"options": name, "max_error_over_update": max(errors),
                         "tolerance": tolerance,
                         "launches": launches, "passed": passed})
            print(f"{name:32s} max |sharded - plain| / scale = {max(errors):.2e}  "
                  f"launches {launches}  {'ok' if passed else 'FAILED'}", flush=True)
    finally:
        dist.destroy_process_group()
        os.unlink(store.name)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sharded_kernel_check.json").write_text(
            json.dumps({"device": str(device), "backend": backend, "rows": rows}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
