"""The one oracle of the test suite: CAME's update rule written from ``CAME_SPEC.md``.

Float64, one parameter at a time, step by step in the spec's numbering, with the opt-in
options as the README's Options section defines them. It shares no code with ``torchcame``
(not even the factoring helpers), so a mistake in the package's shared math cannot hide here.

The spec's rule (matrix case, shape (..., n, m); "mean_-1" is the mean over the last dim):

1. G = g² + ε1
2. r = β2·r + (1−β2)·mean_-1(G);  c = β2·c + (1−β2)·mean_-2(G)
3. v̂ = (r / mean(r)) ⊗ c;  u = g / sqrt(v̂)
4. û = u / max(1, RMS(u) / d)
5. m = β1·m + (1−β1)·û
6. U = (û − m)² + ε2                  (the *new* m)
7. R = β3·R + (1−β3)·mean_-1(U);  C likewise over dim −2
8. Ŝ = (R / mean(R)) ⊗ C;  Δ = m / sqrt(Ŝ)
9. θ = θ − lr·λ·θ
10. θ = θ − lr·Δ

Tensors with fewer than 2 dims: v = β2·v + (1−β2)·G, u = g / sqrt(v), steps 6-8 skipped, Δ = m.
Tensors with more than 2 dims are factored over their last two dims.

Opt-in options (README, Options):

* ``maximize``: the rule applied to −g.
* ``bias_correction``: m divided by (1 − β1ᵗ), the second moment by (1 − β2ᵗ), the
  instability by (1 − β3ᵗ) (the package's choice, which the README leaves implicit: the
  instability (û − m)² uses the uncorrected m; only the step Δ uses m / (1 − β1ᵗ)).
* ``factor_dims="largest"``: factored over the two largest dims (the later one on ties), kept
  in their order; if the smaller of them is below ``factor_min_dim``, the tensor keeps a full
  second moment and takes the <2-D rule.
* ``momentum_dtype``: how m is *stored* between steps. Each step computes with the float m of
  this step (steps 6 and 8 use it); then m is stored as bf16 (round to nearest) or as int8
  block-wise absmax (``quantization_block_size`` consecutive elements of the flattened tensor
  per float32 scale; code q in [-127, 127] stands for q / 127 · absmax, rounded to nearest) for
  tensors of >= 2 dims and >= ``min_quantized_numel`` elements; the next step starts from the
  decoded value. Encoding and decoding are done in float32, which is what a float32 scale means
  (so the oracle's codes are the format's, not a float64 approximation of them).
* bf16/fp16 parameters: math in float64 here (the spec: float32, "whatever the parameter
  dtype"), and θ stored in the parameter's dtype after each of steps 9 and 10 (round to
  nearest, as the reference does). ``stochastic_rounding``: θ computed exactly and rounded once
  per step; the oracle keeps the exact value (stochastic rounding is unbiased), and tests allow
  one spacing of the parameter dtype per step.
* zero-size tensors: the step is counted, nothing else happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

F64 = torch.float64

#: Defaults of every option the oracle reads (README, Options).
DEFAULTS = dict(
    lr=2e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0,
    weight_decay=0.0, maximize=False, momentum_dtype="float32", quantization_block_size=256,
    min_quantized_numel=4096, stochastic_rounding=False, bias_correction=False,
    factor_dims="last_two", factor_min_dim=1,
)
#: Options the oracle ignores: they choose an implementation or guard a step, not the rule.
NOT_ARITHMETIC = ("foreach", "fused", "skip_nonfinite")


def momentum_format(dtype: object) -> str:
    """``momentum_dtype`` as a name (the README accepts ``torch.float32``, ``torch.bfloat16``,
    ``"int8"``)."""
    return {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, dtype)


def encode_int8(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Block-wise absmax int8 (README): codes of ``x``'s shape, one float32 absmax per block."""
    flat = x.detach().to(torch.float32).reshape(-1)
    n = flat.numel()
    padded = torch.zeros(math.ceil(n / block) * block, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.round(blocks * scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[:n].view(x.shape), absmax


def decode_int8(codes: Tensor, absmax: Tensor, block: int) -> Tensor:
    """q / 127 · absmax of each code's block, as float32, in ``codes``' shape."""
    n = codes.numel()
    padded = torch.zeros(math.ceil(n / block) * block, dtype=torch.float32)
    padded[:n] = codes.reshape(-1).to(torch.float32)
    values = padded.view(-1, block) * (absmax.reshape(-1, 1).to(torch.float32) / 127.0)
    return values.reshape(-1)[:n].view(codes.shape)


def factored_dims(shape: tuple[int, ...], policy: str, min_dim: int) -> tuple[int, int] | None:
    """The two dims statistics are factored over (README ``factor_dims``), or None."""
    if len(shape) < 2:
        return None
    if policy == "last_two":
        return (len(shape) - 2, len(shape) - 1)
    order = sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True)
    first, second = sorted(order[:2])
    if min(shape[first], shape[second]) < min_dim:
        return None
    return (first, second)


def quantized(shape: tuple[int, ...], options: dict) -> bool:
    """Whether m of a tensor of ``shape`` is stored as int8 (README ``min_quantized_numel``)."""
    return (momentum_format(options["momentum_dtype"]) == "int8" and len(shape) >= 2
            and math.prod(shape) >= options["min_quantized_numel"])


@dataclass
class ParamState:
    """One parameter's oracle state: float64 statistics in the factored layout (dims last)."""

    shape: tuple[int, ...]
    dims: tuple[int, int] | None
    step: int = 0
    m: Tensor | None = None  # float64, in the factored layout
    r: Tensor | None = None
    c: Tensor | None = None
    R: Tensor | None = None
    C: Tensor | None = None
    v: Tensor | None = None
    stored: dict = field(default_factory=dict)  # m as stored: bf16 tensor or int8 codes+absmax


def init(shape: tuple[int, ...], options: dict) -> ParamState:
    """Zero state (spec: "States start at zero")."""
    dims = factored_dims(tuple(shape), options["factor_dims"], options["factor_min_dim"])
    s = ParamState(tuple(shape), dims)
    layout = _moved_shape(tuple(shape), dims)
    s.m = torch.zeros(layout, dtype=F64)
    if dims is None:
        s.v = torch.zeros(layout, dtype=F64)
    else:
        s.r, s.R = torch.zeros(layout[:-1], dtype=F64), torch.zeros(layout[:-1], dtype=F64)
        col = layout[:-2] + layout[-1:]
        s.c, s.C = torch.zeros(col, dtype=F64), torch.zeros(col, dtype=F64)
    return s


def _moved_shape(shape: tuple[int, ...], dims: tuple[int, int] | None) -> tuple[int, ...]:
    if dims is None:
        return shape
    rest = tuple(n for d, n in enumerate(shape) if d not in dims)
    return rest + (shape[dims[0]], shape[dims[1]])


def _to_layout(x: Tensor, dims: tuple[int, int] | None) -> Tensor:
    return x if dims is None else x.movedim(dims, (-2, -1))


def _from_layout(x: Tensor, dims: tuple[int, int] | None) -> Tensor:
    return x if dims is None else x.movedim((-2, -1), dims)


def _store(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` kept in a parameter of ``dtype`` (round to nearest), back as float64."""
    return x.to(dtype).to(F64) if dtype in (torch.bfloat16, torch.float16) else x


def step(theta: Tensor, grad: Tensor, s: ParamState, options: dict,
         param_dtype: torch.dtype) -> Tensor:
    """One step of the rule for one parameter. Returns the new θ (float64, values of
    ``param_dtype``); updates ``s`` in place."""
    o = {**DEFAULTS, **{k: v for k, v in options.items() if k not in NOT_ARITHMETIC}}
    b1, b2, b3 = (float(b) for b in o["betas"])
    e1, e2 = (float(e) for e in o["eps"])
    d, wd = float(o["clip_threshold"]), float(o["weight_decay"])
    lr = float(o["lr"])
    s.step += 1
    t = s.step
    if theta.numel() == 0:
        return theta
    g = grad.to(F64)
    if o["maximize"]:
        g = -g
    dims = s.dims
    g = _to_layout(g, dims)
    # 1. G = g² + ε1
    G = g * g + e1
    if dims is not None:
        # 2. row and column EMAs of G
        s.r = b2 * s.r + (1 - b2) * G.mean(dim=-1)
        s.c = b2 * s.c + (1 - b2) * G.mean(dim=-2)
        # 3. v̂ = (r / mean(r)) ⊗ c
        v_hat = (s.r / s.r.mean(dim=-1, keepdim=True))[..., :, None] * s.c[..., None, :]
    else:
        s.v = b2 * s.v + (1 - b2) * G
        v_hat = s.v
    if o["bias_correction"]:
        v_hat = v_hat / (1 - b2**t)
    u = g / torch.sqrt(v_hat)
    # 4. û = u / max(1, RMS(u) / d)
    rms = math.sqrt(float((u * u).mean()))
    u_hat = u / max(1.0, rms / d)
    # 5. m = β1·m + (1−β1)·û
    m = b1 * s.m + (1 - b1) * u_hat
    if dims is not None:
        # 6. instability with the new m
        U = (u_hat - m) ** 2 + e2
        # 7. its row and column EMAs
        s.R = b3 * s.R + (1 - b3) * U.mean(dim=-1)
        s.C = b3 * s.C + (1 - b3) * U.mean(dim=-2)
        # 8. Ŝ and Δ
        S_hat = (s.R / s.R.mean(dim=-1, keepdim=True))[..., :, None] * s.C[..., None, :]
        if o["bias_correction"]:
            S_hat = S_hat / (1 - b3**t)
        delta = m / torch.sqrt(S_hat)
    else:
        delta = m
    if o["bias_correction"]:
        delta = delta / (1 - b1**t)
    s.m = _stored_momentum(m, s, o)
    delta = _from_layout(delta, dims)
    theta = theta.to(F64)
    if o["stochastic_rounding"] and param_dtype in (torch.bfloat16, torch.float16):
        return theta - lr * wd * theta - lr * delta  # exact; the tests allow the rounding
    # 9. decoupled weight decay, then 10. the step; each result stored in the param dtype
    if wd != 0:
        theta = _store(theta - lr * wd * theta, param_dtype)
    return _store(theta - lr * delta, param_dtype)


def _stored_momentum(m: Tensor, s: ParamState, o: dict) -> Tensor:
    """m after a round trip through its storage format (float64, factored layout)."""
    fmt = momentum_format(o["momentum_dtype"])
    if quantized(s.shape, o):
        block = o["quantization_block_size"]
        codes, absmax = encode_int8(_from_layout(m, s.dims), block)
        s.stored = {"exp_avg": codes, "exp_avg_absmax": absmax}
        return _to_layout(decode_int8(codes, absmax, block).to(F64), s.dims)
    if fmt == "bfloat16":
        stored = _from_layout(m, s.dims).to(torch.bfloat16)
        s.stored = {"exp_avg": stored}
        return _to_layout(stored.to(F64), s.dims)
    s.stored = {}
    return m


def state_dict(s: ParamState) -> dict[str, Tensor]:
    """The state under the package's names (``CAME_SPEC.md``), in the parameter's layout."""
    out: dict[str, Tensor] = {"step": torch.tensor(float(s.step))}
    out["exp_avg"] = s.stored.get("exp_avg", _from_layout(s.m, s.dims))
    if "exp_avg_absmax" in s.stored:
        out["exp_avg_absmax"] = s.stored["exp_avg_absmax"]
    if s.dims is None:
        out["exp_avg_sq"] = s.v
    else:
        out.update(exp_avg_sq_row=s.r, exp_avg_sq_col=s.c, exp_avg_res_row=s.R,
                   exp_avg_res_col=s.C)
    return out


class Oracle:
    """The rule for a list of parameters: ``step(grads)`` with ``None`` for a parameter that
    has no gradient this step (it is skipped: no state change, as ``torch.optim`` does)."""

    def __init__(self, params: list[Tensor], options: dict) -> None:
        self.options = {**DEFAULTS, **options}
        self.dtypes = [p.dtype for p in params]
        self.theta = [p.detach().to(F64).clone() for p in params]
        self.states: list[ParamState | None] = [None] * len(params)

    def step(self, grads: list[Tensor | None]) -> None:
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.states[i] is None:
                self.states[i] = init(tuple(self.theta[i].shape), self.options)
            self.theta[i] = step(self.theta[i], g, self.states[i], self.options, self.dtypes[i])
