"""Where the fused CPU step's time goes: seconds and bandwidth of each pass over memory.

Builds the working tree's kernel a second time with ``-DTORCHCAME_PASS_TIMING`` (its own name
and C++ namespace; the package's build is untouched), steps ``CAME(fused=True)`` through it
and ``torch.optim.AdamW(fused=True)`` in turn, and reports per pass of the factored tensors
(float32) the median time per step and the bytes it moved per second, reads apart:

========  ===========================================  ===============
pass      traffic per element (float32)                reads / writes
========  ===========================================  ===============
1         read g: row and column sums of g^2 + eps1     4 / 0
2         read g: sum of u^2                            4 / 0
3         read g and m, write m: momentum, sums of U    8 / 4
4         read m and p, write p: the update             8 / 4
========  ===========================================  ===============

    python benchmarks/pass_timing.py --sets big-matrix,gpt2-124m --threads 1

Compare each pass's read rate with the bench's read probe (``torchcame bench``: "read (sum a)")
to see which pass is below the machine's read bandwidth. Stop other jobs on the machine first.
Pass times are exact with one thread, or for a set of one tensor: with more threads the kernel
steps small tensors side by side (one per thread), and their pass times add up beyond the wall
time (the script says so when it happens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PASS_BYTES = ((4, 0), (4, 0), (8, 4), (8, 4))  # (read, written) bytes per element, float32


def build_timed_kernel():
    """The working tree's kernel, compiled with the pass timers."""
    from torch.utils.cpp_extension import load

    from torchcame._impl import cpu_kernel

    name, cflags = cpu_kernel._build_name()
    source = REPO / "src" / "torchcame" / "_impl" / "csrc" / "came_cpu.cpp"
    return load(name=name.replace("torchcame_cpu_", "torchcame_cpu_timing_"),
                sources=[str(source)],
                extra_cflags=[*cflags, "-DTORCHCAME_PASS_TIMING",
                              "-Dtorchcame=torchcame_pass_timing"],
                extra_ldflags=["-fopenmp"])


def measure(set_name: str, kernel, rounds: int) -> dict:
    from torchcame import CAME
    from torchcame._impl import cpu_kernel
    from torchcame.bench.shapes import param_shapes

    shapes = param_shapes(set_name)
    gen = torch.Generator().manual_seed(0)
    came_params, adamw_params = [], []
    for shape in shapes:
        p = torch.nn.Parameter(0.02 * torch.randn(shape, generator=gen))
        p.grad = 1e-3 * torch.randn(shape, generator=gen)
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        came_params.append(p)
        adamw_params.append(q)
    came = CAME(came_params, lr=1e-4, fused=True)
    adamw = torch.optim.AdamW(adamw_params, lr=1e-4, fused=True)
    cpu_kernel._module = kernel
    try:
        for _ in range(2):
            came.step()
            adamw.step()
        kernel.pass_times()
        passes, came_s, adamw_s = [], [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            came.step()
            came_s.append(time.perf_counter() - t0)
            passes.append(kernel.pass_times())
            t0 = time.perf_counter()
            adamw.step()
            adamw_s.append(time.perf_counter() - t0)
    finally:
        cpu_kernel._module = None
    factored = sum(torch.Size(s).numel() for s in shapes if len(s) >= 2)
    numel = sum(torch.Size(s).numel() for s in shapes)
    rows = []
    for i, (read, written) in enumerate(PASS_BYTES):
        seconds = statistics.median(p[i] for p in passes)
        rows.append({"pass": i + 1, "ms": seconds * 1e3,
                     "read_GBps": read * factored / seconds / 1e9,
                     "total_GBps": (read + written) * factored / seconds / 1e9})
    adamw_t = statistics.median(adamw_s)
    return {"set": set_name, "threads": torch.get_num_threads(), "passes": rows,
            "came_ms": statistics.median(came_s) * 1e3, "adamw_ms": adamw_t * 1e3,
            "adamw_read_GBps": 16 * numel / adamw_t / 1e9,
            "adamw_total_GBps": 28 * numel / adamw_t / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="big-matrix,gpt2-124m")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = build_timed_kernel()
    for set_name in args.sets.split(","):
        r = measure(set_name, kernel, args.rounds)
        print(f"{r['set']} ({r['threads']} threads): fused CAME {r['came_ms']:.1f} ms, fused "
              f"AdamW {r['adamw_ms']:.1f} ms (AdamW reads {r['adamw_read_GBps']:.1f} GB/s, "
              f"moves {r['adamw_total_GBps']:.1f})")
        if sum(p["ms"] for p in r["passes"]) > 1.02 * r["came_ms"]:
            print("  (tensors ran side by side: the pass times below add up beyond the step)")
        for p in r["passes"]:
            print(f"  pass {p['pass']}: {p['ms']:7.2f} ms  reads {p['read_GBps']:5.1f} GB/s  "
                  f"moves {p['total_GBps']:5.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
