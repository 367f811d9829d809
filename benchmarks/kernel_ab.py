"""Two builds of the fused CPU kernel against each other, in one process, round by round.

On a shared, noisy machine, separate benchmark runs of two kernel versions differ by more
than most kernel changes (±10% here between runs minutes apart). This script loads the
kernel built from the working tree's sources and one built from another git revision's
``csrc/`` into the same process, steps both (each on its own copy of the same parameters,
gradients and state) and fused AdamW in turn, round after round, and reports the median
over rounds of the per-round ratios: candidate / base, and each / fused AdamW.

    python benchmarks/kernel_ab.py --base HEAD              # working tree vs the last commit
    python benchmarks/kernel_ab.py --base 26eaf2a~0 --sets big-matrix --rounds 31

Calibration on this repository's shared 2-core machine: the working tree against its own
HEAD (the same sources, two builds), 15 rounds, 2 threads, gave candidate/base 1.062 (GPT-2
shapes), 1.033 (ViT-B) and 0.984 (one 8192x4096 matrix): differences under about 6% are
noise there.

The base revision must have the same kernel entry points as the working tree (the layout of
``step_cpu_kernel``'s calls, from the move to ``csrc/`` on); each build takes about a minute
once and is cached like the package's own.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CSRC = "src/torchcame/_impl/csrc"


def build_from_revision(rev: str):
    """The kernel module built from ``rev``'s ``csrc/`` sources (cached by their hash)."""
    from torch.utils.cpp_extension import load

    from torchcame._impl import cpu_kernel

    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}:{CSRC}"],
                           check=True, capture_output=True, text=True).stdout.split()
    tmp = Path(tempfile.mkdtemp(prefix="kernel_ab_"))
    key = hashlib.sha1(rev.encode())
    for name in sorted(names):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{CSRC}/{name}"],
                              check=True, capture_output=True).stdout
        (tmp / name).write_bytes(text)
        key.update(name.encode() + text)
    _, cflags = cpu_kernel._build_name()
    key.update(" ".join(cflags).encode())
    main = [n for n in names if n.endswith(".cpp")]
    # its own C++ namespace, so that its pybind11 types do not clash with the candidate's
    return load(name=f"torchcame_cpu_ab_{key.hexdigest()[:12]}",
                sources=[str(tmp / n) for n in main],
                extra_cflags=[*cflags, "-Dtorchcame=torchcame_ab_base"],
                extra_ldflags=["-fopenmp"])


def _stepper(cpu_kernel, kernel, opt):
    """A step of ``opt`` through ``kernel`` (the module the fused path calls)."""

    def step() -> None:
        cpu_kernel._module = kernel
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision of the base kernel")
    parser.add_argument("--sets", default="gpt2-124m,vit-b16,big-matrix")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from torchcame import CAME
    from torchcame._impl import cpu_kernel
    from torchcame.bench.shapes import param_shapes
    from torchcame.bench.timing import interleaved_times, median_ratios

    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = {"candidate": cpu_kernel.load_kernel(), "base": build_from_revision(args.base)}
    if kernels["candidate"] is None:
        raise SystemExit("the working tree's kernel could not be built")
    print(f"threads {torch.get_num_threads()}; base {args.base}; {args.rounds} rounds")
    for set_name in args.sets.split(","):
        gen = torch.Generator().manual_seed(0)
        params = []
        for shape in param_shapes(set_name):
            p = torch.nn.Parameter(0.02 * torch.randn(shape, generator=gen))
            p.grad = 1e-3 * torch.randn(shape, generator=gen)
            params.append(p)
        copies = {name: [copy.deepcopy(p) for p in params] for name in kernels}
        for ps in copies.values():
            for p, q in zip(ps, params, strict=True):
                p.grad = q.grad.clone()
        opts = {name: CAME(ps, lr=1e-4, fused=True) for name, ps in copies.items()}
        steps = {name: _stepper(cpu_kernel, kernels[name], opts[name]) for name in kernels}
        adamw = torch.optim.AdamW(params, lr=1e-4, fused=True)
        steps["AdamW fused"] = adamw.step
        for step in steps.values():  # state allocation and warm-up
            step()
            step()
        times = interleaved_times(steps, args.rounds)
        to_adamw = median_ratios(times, "AdamW fused")
        to_base = median_ratios(times, "base")
        print(f"{set_name:11s} candidate/base {to_base['candidate']:.3f}   "
              f"candidate/AdamW {to_adamw['candidate']:.3f}   base/AdamW {to_adamw['base']:.3f}"
              f"   (AdamW median {1e3 * statistics.median(times['AdamW fused']):.1f} ms)")
    cpu_kernel._module = kernels["candidate"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
