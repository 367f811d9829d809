#!/usr/bin/env bash
# A wheel-installed `fused=True` works (issue #11): build the wheel with `pip wheel .`, install
# it non-editable into a scratch directory, and from outside the repository check that a fused
# step compiles the CPU kernel from the installed package data (a fresh extension cache) and
# matches the reference path. Reuses the active environment's torch and ninja.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python -m pip wheel . --no-deps -q -w "$scratch/wheel"
python -m pip install -q --no-deps --target "$scratch/site" "$scratch"/wheel/torchcame-*.whl
cd "$scratch"
export PYTHONPATH="$scratch/site" TORCH_EXTENSIONS_DIR="$scratch/extensions"
unset TORCHCAME_NO_KERNEL
python - <<'EOF'
import os
import warnings

import torch

import torchcame
from torchcame._impl import cpu_kernel

site = os.environ["PYTHONPATH"]
assert torchcame.__file__.startswith(site), f"imported {torchcame.__file__}, not the wheel"
assert (cpu_kernel.SOURCE_DIR / "came_cpu.cpp").is_file(), "kernel source not in the wheel"
warnings.filterwarnings("error", message=".*native CPU kernel")  # no silent fallback


def run(**flags):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(64, 48), (48,)]]
    opt = torchcame.CAME(params, lr=1e-2, weight_decay=0.01, **flags)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params


fused, reference = run(fused=True), run(foreach=False)
module = cpu_kernel._module
assert module is not None and module.__file__.startswith(os.environ["TORCH_EXTENSIONS_DIR"])
build_file = os.path.join(os.path.dirname(module.__file__), "build.ninja")
assert str(cpu_kernel.SOURCE_DIR) in open(build_file).read(), "not built from the wheel"
for a, b in zip(fused, reference):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
print(f"wheel check: fused=True compiled {os.path.basename(module.__file__)} from "
      f"{cpu_kernel.SOURCE_DIR} and matches the reference")
EOF
