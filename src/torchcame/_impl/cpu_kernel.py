"""The native CPU kernel of the fused CAME step: its loader and its one driver.

The kernel is C++ source shipped inside the package (``_impl/csrc/came_cpu.cpp`` and
``came_cpu.h``; their header comment documents the passes and the bytes per element). It is
compiled just in time with ``torch.utils.cpp_extension.load`` the first time it is needed
(about a minute) and cached per user in torch's extension directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``), under a name keyed by the source files' contents, the
compiler flags, the torch version and the CPU's vector capability. A cached build loads
without a compiler. With no working C++ compiler or ninja, :func:`load_kernel` warns once,
saying so and naming the path that runs instead, and returns ``None``.

:func:`step_cpu_kernel` steps a list of parameters with it. ``TORCHCAME_NO_KERNEL=1``
disables the kernel; ``TORCHCAME_VERBOSE_BUILD=1`` shows the compiler's output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from .._factored import bias_correction_scales, compute_dtype
from ..options import StepArgs
from ..state import StateLayout

__all__ = ["load_kernel", "kernel_buildable", "kernel_available", "kernel_workspace_bytes",
           "step_cpu_kernel", "SOURCE_DIR"]

#: The kernel's C++ sources (package data).
SOURCE_DIR = Path(__file__).with_name("csrc")
_MAIN_SOURCE = SOURCE_DIR / "came_cpu.cpp"

#: The kernel's codes of :attr:`torchcame.state.StateLayout.momentum` (``MomentumFormat``).
_MOMENTUM_FORMATS = {"float32": 0, "bfloat16": 1, "int8": 2}
_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_FALLBACK_PATH = "the multi-tensor (foreach) path"

_log = logging.getLogger("torchcame")
_module: ModuleType | None = None
_failure: str | None = None


# ------------------------------------------------------------------------------------ loader


def _vector_flags() -> tuple[str, list[str]]:
    """Compiler flags for the CPU's vector capability as torch reports it (not -march=native,
    so a cached build is valid on any machine of the same capability)."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        capability = "DEFAULT"
    flags = {
        "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                   "-mprefer-vector-width=512"],
        "AVX2": ["-mavx2", "-mfma"],
    }.get(capability, [])
    return capability, flags


def _build_name() -> tuple[str, list[str]]:
    """The extension's name (keyed by sources, flags, torch version, capability) and flags."""
    capability, vector_flags = _vector_flags()
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", *vector_flags]
    key = hashlib.sha1()
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.suffix in (".cpp", ".h"):
            key.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    key.update((" ".join(cflags) + torch.__version__).encode())
    return f"torchcame_cpu_{capability.lower()}_{key.hexdigest()[:12]}", cflags


def _build_directory(name: str) -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, False)


def _load_cached(name: str) -> ModuleType | None:
    """The module of a finished earlier build of ``name``, or ``None`` (needs no compiler)."""
    try:
        path = os.path.join(_build_directory(name), f"{name}.so")
        if not os.path.exists(path):
            return None
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # a partial or foreign file: build it again
        return None


def _cached(name: str) -> bool:
    try:
        return os.path.exists(os.path.join(_build_directory(name), f"{name}.so"))
    except Exception:
        return False


def _ninja_on_path() -> bool:
    """Whether ``ninja`` runs; puts the ``ninja`` package's binary on ``PATH`` if needed (a
    venv's python run without activating the venv)."""
    from torch.utils.cpp_extension import is_ninja_available

    if is_ninja_available():
        return True
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return is_ninja_available()


def _toolchain_problem() -> str | None:
    """Why the kernel cannot be built here (no compiler, no ninja), or ``None``."""
    compiler = os.environ.get("CXX", "c++")  # what torch's build uses
    words = shlex.split(compiler) or ["c++"]
    executable = shutil.which(words[0])
    if executable is None:
        return (f"no C++ compiler was found ({compiler!r} is not on PATH; "
                "install g++ or clang++, or set CXX)")
    try:
        subprocess.run([executable, *words[1:], "--version"], check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return f"no working C++ compiler was found ({compiler!r} --version failed)"
    if not _ninja_on_path():
        return "ninja was not found (pip install ninja)"
    return None


def _build_error(exc: Exception) -> str:
    """A one-line reason from a failed build: the compiler's first error, if it printed one."""
    for line in str(exc).splitlines():
        if "error:" in line and not line.lstrip().startswith("["):  # not a ninja command line
            return f"the C++ compiler failed to build it ({line.strip()[:300]})"
    return f"the C++ build failed ({type(exc).__name__})"


def kernel_buildable() -> bool:
    """Whether the kernel is loaded, cached, or a compiler and ninja are here (builds nothing)."""
    if _module is not None:
        return True
    if _failure is not None or os.environ.get("TORCHCAME_NO_KERNEL"):
        return False
    return _cached(_build_name()[0]) or _toolchain_problem() is None


def load_kernel(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, or ``None`` if it cannot be built (reason in a warning).

    Loads a cached build when there is one; otherwise checks for a working C++ compiler
    (``CXX``, default ``c++``) and ninja, then compiles ``csrc/came_cpu.cpp``. Every failure
    warns once (a ``RuntimeWarning`` that says what is missing and which path runs instead)
    and is remembered for the process. ``TORCHCAME_NO_KERNEL=1`` disables the kernel quietly.
    """
    global _module, _failure
    if _module is not None or _failure is not None:
        return _module
    if os.environ.get("TORCHCAME_NO_KERNEL"):
        _failure = "disabled by TORCHCAME_NO_KERNEL"
        return None
    name, cflags = _build_name()
    _module = _load_cached(name)
    if _module is not None:
        return _module
    _failure = _toolchain_problem()
    if _failure is None:
        _log.warning("torchcame: building the fused CPU kernel %s (one time, about a minute; "
                     "cached afterwards; fused=False skips it)", name)
        try:
            from torch.utils.cpp_extension import load

            _module = load(
                name=name,
                sources=[str(_MAIN_SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                verbose=verbose or bool(os.environ.get("TORCHCAME_VERBOSE_BUILD")),
            )
            _log.warning("torchcame: fused CPU kernel built")
        except Exception as exc:  # headers missing, compiler error, ...
            _failure = _build_error(exc)
    if _module is None:
        warnings.warn(
            f"torchcame: fused=True cannot use its native CPU kernel: {_failure}. "
            f"{_FALLBACK_PATH[0].upper()}{_FALLBACK_PATH[1:]} runs instead (same results as "
            "the default path, without the kernel's speed). Set TORCHCAME_VERBOSE_BUILD=1 to "
            "see the build; fused=False avoids the kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _module


def kernel_available() -> bool:
    """Whether the native CPU kernel is (or can be) built; builds it on first call."""
    return load_kernel() is not None


# ------------------------------------------------------------------------------------ driver


def _kernel_tensors(param: Tensor, grad: Tensor, state: dict, layout: StateLayout
                    ) -> tuple[Tensor, ...] | None:
    """``(param, grad, exp_avg, *statistics)`` as the kernel takes them (the factored dims
    last), or ``None`` for a tensor the kernel cannot step."""
    if (param.device.type != "cpu" or grad.device.type != "cpu"
            or param.dtype not in _PARAM_DTYPES or grad.dtype != param.dtype
            or layout.compute_dtype != compute_dtype(param.dtype)
            or (param.dtype == torch.float64 and layout.momentum != "float32")):
        # e.g. float32 grads of bf16 params: the kernel reads grads in the param's dtype,
        # and rounding them to bf16 would change the result; the foreach path upcasts.
        return None
    exp_avg = state["exp_avg"]
    if layout.factored:
        if layout.moved(param.dim()):  # a view with the factored dims last: contiguous only
            dims = layout.factored_dims  # when the dims moved over them have size 1
            param, grad, exp_avg = (t.movedim(dims, (-2, -1)) for t in (param, grad, exp_avg))
        statistics = [state[key] for key in ("exp_avg_sq_row", "exp_avg_sq_col",
                                             "exp_avg_res_row", "exp_avg_res_col")]
    else:
        statistics = [state["exp_avg_sq"]]
    for t in (param, exp_avg, *statistics):  # a loop, not all(genexpr): every step, every tensor
        if not t.is_contiguous() or t.device.type != "cpu":
            return None  # written in place: the kernel needs them contiguous
    # a non-contiguous gradient (channels_last, transposed) is read from a contiguous copy
    return (param, grad.contiguous(), exp_avg, *statistics)


def _bias_correction(args: StepArgs, state: dict, factored: bool) -> tuple[float, float]:
    """The bias-correction factors of u and of the step (1 and 1 without the option), from
    :func:`torchcame._factored.bias_correction_scales` (t = the state's counted step)."""
    if not args.bias_correction:
        return 1.0, 1.0
    return bias_correction_scales(float(state["step"]), args.betas, factored)


def step_cpu_kernel(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    args: StepArgs,
    layouts: list[StateLayout],
) -> list[int]:
    """One CAME step of every tensor the native CPU kernel can take, in place.

    The caller has already counted this step in each ``state["step"]`` (bias correction
    reads it); this function does not count it. Each tensor's state is laid out as its
    ``layouts`` entry says (momentum format and block size, factored dims); nothing is
    inferred from dtypes.

    Per factored tensor the kernel reads the gradient three times (bf16/int8 momentum: four),
    the momentum twice and writes it once, and reads/writes the parameter once: 32 bytes per
    element for float32 params and momentum, about 15 for bf16 params with int8 momentum
    (``csrc/came_cpu.cpp`` lists the passes). No full-size temporary is allocated: bf16/int8
    momentum is decoded and re-encoded a row or a block at a time, and bf16/fp16 weights are
    rounded stochastically as they are written (``args.stochastic_rounding``). The random
    bits come from a counter-based generator seeded by one draw from torch's default
    generator per call, so results are reproducible under ``torch.manual_seed`` but are not
    the reference path's ``torch.rand`` draws.

    Every option of ``args`` runs inside the kernel, ``bias_correction`` included. Factored
    dims other than the last two (``factor_dims="largest"``) are supported when moving them
    last needs no copy (the dims moved over them have size 1, as in a 1x1 conv weight
    ``(o, i, 1, 1)``); other such tensors are left to the caller.

    Returns:
        The indices of the tensors not touched (their state unchanged), for the caller to
        step on another path: tensors not on the CPU, of a dtype the kernel lacks (or float64
        with low-bit momentum), with a gradient of another dtype than the parameter, whose
        parameter or state is non-contiguous (a non-contiguous gradient is copied), with
        factored dims it cannot view as last; all of them when the kernel cannot be built
        (see :func:`load_kernel`). Zero-size tensors count as stepped.
    """
    kernel = load_kernel()
    if kernel is None:
        return list(range(len(params)))
    untouched: list[int] = []
    factored: list[tuple[tuple[Tensor, ...], dict, StateLayout]] = []
    vectors: list[tuple[tuple[Tensor, ...], dict, StateLayout]] = []
    for i, (param, grad, state, layout) in enumerate(zip(params, grads, states, layouts,
                                                         strict=True)):
        tensors = _kernel_tensors(param, grad, state, layout)
        if tensors is None:
            untouched.append(i)
        elif param.numel() > 0:
            (factored if layout.factored else vectors).append((tensors, state, layout))
    hyper = kernel.Hyper()
    hyper.lr = float(args.lr)
    hyper.lr_is_tensor = isinstance(args.lr, Tensor)  # decay rounds lr to the param dtype
    hyper.weight_decay = float(args.weight_decay)
    hyper.beta1, hyper.beta2, hyper.beta3 = (float(beta) for beta in args.betas)
    hyper.eps1, hyper.eps2 = (float(eps) for eps in args.eps)
    hyper.clip_threshold = float(args.clip_threshold)
    hyper.maximize = bool(args.maximize)
    hyper.stochastic_rounding = bool(args.stochastic_rounding)
    if args.stochastic_rounding and len(untouched) < len(params):
        # one draw from torch's default generator per call that steps anything
        hyper.seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    empty = torch.empty(0)
    for entries, step in ((factored, kernel.factored_step), (vectors, kernel.vector_step)):
        if not entries:
            continue
        tensors, states_, layouts_ = zip(*entries, strict=True)
        kernel_params, kernel_grads, exp_avgs, *statistics = map(list, zip(*tensors, strict=True))
        absmaxes = [state["exp_avg_absmax"] if layout.quantized else empty
                    for state, layout in zip(states_, layouts_, strict=True)]
        scales = [_bias_correction(args, state, layout.factored)
                  for state, layout in zip(states_, layouts_, strict=True)]
        step(kernel_params, kernel_grads, exp_avgs, absmaxes, *statistics,
             [_MOMENTUM_FORMATS[layout.momentum] for layout in layouts_],
             [int(layout.block_size) for layout in layouts_],
             [update_scale for update_scale, _ in scales],
             [step_scale for _, step_scale in scales],
             hyper)
    return untouched


def kernel_workspace_bytes(shape: tuple[int, ...] | torch.Size, threads: int | None = None,
                           unit: int | None = None) -> int:
    """An upper bound of the heap memory the CPU kernel allocates to step one tensor.

    The kernel's scratch memory is plain C++ vectors (not tensors), which tensor-level memory
    trackers do not see; memory benchmarks add this bound. ``unit`` is the storage unit of a
    low-bit momentum or of stochastically rounded weights (elements per int8 block, or 4096);
    ``None`` for float32 momentum without stochastic rounding. Factored ``(B, n, m)``, float32
    compute dtype: row and column sums in double (``B n + (threads + 1) B m``), four float
    factor vectors (``2 (B n + B m)``), per-thread row buffers (``2 m`` floats); every
    tensor: per-thread sums of squares and two buffers of one storage unit per thread
    (momentum and new weights).
    """
    threads = torch.get_num_threads() if threads is None else threads
    numel = 1
    for d in shape:
        numel *= int(d)
    per_thread = 8 * 8 + 2 * 4 * min(unit or 0, numel)  # m and new-weight buffers
    if len(shape) >= 2 and int(shape[-1]) > 0 and int(shape[-2]) > 0:
        m, n = int(shape[-1]), int(shape[-2])
        B = numel // (n * m)
        doubles = B * n + (threads + 1) * B * m
        floats = 2 * (B * n + B * m) + threads * 2 * m
        return 8 * doubles + 4 * floats + threads * per_thread
    return threads * per_thread
