"""The one training driver of the test suite, and the inputs it is fed.

Every test that steps an optimizer more than once calls :func:`train`: the table's invariants,
the came-pytorch parity runs, schedulers, ``torch.compile``, the low-memory tests and the
distributed scenarios (whose workers import this module too).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

import torch

from torchcame import CAME


def make_params(shapes, dtype=torch.float32, seed: int = 0, layout: str = "contiguous"):
    """Leaf tensors of ``shapes`` drawn from N(0, 1) in float64 (the same values in every
    dtype), ``requires_grad``. ``layout="strided"``: >= 2-D tensors are transposed views
    (non-contiguous) and 4-D ones channels_last; the values are the contiguous ones."""
    gen = torch.Generator().manual_seed(seed)
    return [
        relayout(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype), layout)
        .requires_grad_()
        for s in shapes
    ]


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values in a memory layout: ``"contiguous"`` or ``"strided"`` (see above)."""
    if layout == "contiguous" or x.dim() < 2:
        return x.detach()
    if x.dim() == 4:
        return x.detach().contiguous(memory_format=torch.channels_last)
    return x.detach().transpose(-1, -2).contiguous().transpose(-1, -2)


def clone_params(params):
    """Copies with the same values, dtypes and strides, as new leaves."""
    return [p.detach().clone().requires_grad_() for p in params]


def random_grads(params, step: int, seed: int = 1, scale: float = 1.0):
    """N(0, scale²) gradients for step ``step`` (a function of the step: any run can replay
    any step), in each parameter's dtype."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return [
        (scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)
        for p in params
    ]


def assign(params, grads: Callable[[int], Iterable]) -> Callable[[int], None]:
    """A ``set_grads`` for :func:`train`: ``p.grad = g`` for each ``g`` of ``grads(step)``
    (``None`` entries leave the parameter without a gradient this step)."""
    def set_grads(step: int) -> None:
        for p, g in zip(params, grads(step), strict=True):
            p.grad = None if g is None else g.clone()
    return set_grads


def train(optimizer, steps: int, set_grads: Callable[[int], object], *, start: int = 0,
          step: Callable[[], object] | None = None,
          after: Callable[[int], object] | None = None, zero_grad: bool = True) -> None:
    """Steps ``start .. start + steps - 1``: ``set_grads(t)`` (assign or backward), then
    ``step()`` (default ``optimizer.step``), ``after(t)`` (a scheduler, a check) and
    ``optimizer.zero_grad()``."""
    for t in range(start, start + steps):
        set_grads(t)
        (step or optimizer.step)()
        if after is not None:
            after(t)
        if zero_grad:
            optimizer.zero_grad()


def grads_of(params, layout: str = "contiguous"):
    """The table's gradients for step t (tests/cases.py): N(0, s²) with s cycling through
    GRAD_SCALES, None for the params the table leaves without a gradient."""
    from cases import GRAD_SCALES, NEVER_GRAD, NONE_ON_ODD_STEPS

    def grads(t: int):
        out = [relayout(g, layout) for g in
               random_grads(params, t, scale=GRAD_SCALES[t % len(GRAD_SCALES)])]
        if t % 2:
            out[NONE_ON_ODD_STEPS] = None
        out[NEVER_GRAD] = None
        return out
    return grads


def run_case(case, dtype: torch.dtype, impl: str, layout: str = "contiguous", shapes=None,
             steps: int | None = None):
    """(params, optimizer) after ``steps`` (default STEPS) steps of a table row (``case``,
    a :class:`cases.Case`) on ``shapes`` (default SHAPES), with the table's gradients."""
    from cases import IMPLS, SHAPES, STEPS

    params = make_params(SHAPES if shapes is None else shapes, dtype, layout=layout)
    opt = CAME(params, **case.kwargs(), **IMPLS[impl])
    torch.manual_seed(0)  # stochastic rounding's draws
    train(opt, STEPS if steps is None else steps, assign(params, grads_of(params, layout)))
    return params, opt


def assert_same_run(params_a, opt_a, params_b, opt_b, what: str = "") -> None:
    """Bitwise equal params and state (keys, dtypes, values)."""
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        assert torch.equal(a, b) and a.dtype == b.dtype, f"{what}: param {i}"
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sa.keys() == sb.keys(), f"{what}: param {i} state keys"
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, f"{what}: param {i} {key} dtype"
            assert torch.equal(sa[key], sb[key]), f"{what}: param {i} {key}"


def save_load(obj):
    """``obj`` after a ``torch.save``/``torch.load(weights_only=True)`` round trip."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------- errors change nothing


def snapshot(optimizer, params) -> dict:
    """Everything a failed call must leave as it was: the params (values, dtype, strides),
    their grads, the optimizer's state (every parameter it knows) and its param_groups."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    snap = {
        "params": [(p.detach().clone(), p.stride(), p.dtype) for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
    }
    if optimizer is not None:
        known = [p for g in optimizer.param_groups for p in g["params"]]
        snap["state"] = {i: copy(dict(optimizer.state[p])) for i, p in enumerate(known)
                         if p in optimizer.state}
        snap["groups"] = [{k: ([id(p) for p in v] if k == "params" else copy(v))
                           for k, v in g.items()} for g in optimizer.param_groups]
    return snap


def assert_same_values(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and a.layout == b.layout, where
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        assert torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys changed"
        for k in a:
            assert_same_values(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_values(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} -> {b!r}"


def assert_raises_untouched(optimizer, params, action: Callable[[], object], exc_type,
                            match: str) -> BaseException:
    """Run ``action``; it must raise ``exc_type`` with a message matching ``match`` (a regex
    that names the bad value), and leave ``params``, their grads, and ``optimizer``'s state
    and param_groups (``optimizer`` may be None) exactly as they were. Returns the error."""
    import pytest

    before = snapshot(optimizer, params)
    with pytest.raises(exc_type, match=match) as info:
        action()
    assert_same_values(snapshot(optimizer, params), before, "after the error")
    return info.value


# ------------------------------------------------------------------ distributed launches


def free_port() -> int:
    """A TCP port the OS says is free (for a gloo rendezvous on 127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: str, world: int, args: list[str], timeout: float,
                 env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> list[str]:
    """Run ``script`` as ``world`` OS processes (``--rank R --world-size W --port P`` plus
    ``args``), one thread each, with ``env`` added to this process's environment and the
    ``unset`` variables removed; wait for all and assert every rank exited cleanly (the
    failing ranks' logs in the message). Returns each rank's output."""
    import os
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    for name in unset:
        env.pop(name, None)
    procs = [subprocess.Popen([sys.executable, script, "--rank", str(r), "--world-size",
                               str(world), "--port", str(port), *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"ranks failed {failed}:\n" + "\n".join(logs)[-6000:]
    return logs


def exit_rank() -> None:
    """End a rank script once its results are on disk: flush, then leave without interpreter
    teardown (gloo under torch 2.13 sometimes aborts a rank there after
    destroy_process_group, "terminate called without an active exception")."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_parser():
    """The command line of a rank started by :func:`launch_ranks` (``--rank``,
    ``--world-size``, ``--port``, ``--out``); a script adds its own arguments to it."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    return parser
