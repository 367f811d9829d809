"""The native CPU kernel of the fused CAME step (C++ source, compiled just in time).

:func:`load_kernel` compiles the source below with ``torch.utils.cpp_extension.load_inline``
the first time it is needed (about a minute; cached per user afterwards, keyed by the source,
the flags and the CPU's vector capability) and returns the module, or ``None`` with a reason
when there is no working compiler.

One factored tensor of shape ``(B, n, m)`` (leading dims flattened) is stepped in four
passes over its rows, parallel over rows with ``at::parallel_for``:

1. read g: row sums and (per-thread) column sums of ``G = g^2 + eps1`` -> r, c, and the
   factors ``rsqrt(r / mean(r))``, ``rsqrt(c)`` (vectors of length n and m);
2. read g: ``sum u^2`` with ``u = (rf_i cf_j) g`` -> the RMS clip divisor;
3. read g, read/write m: ``u_hat``, the momentum update, row/col sums of
   ``U = (u_hat - m)^2 + eps2`` -> R, C and their factors;
4. read m, read/write p: weight decay and ``p -= lr (Rf_i Cf_j) m``.

No full-size temporary is allocated: u, U and S_hat exist only element by element. Extra
memory is O(threads * (B m) + B n) doubles. Tensors with fewer than two dims take two passes
(v and sum u^2; then m and p). The math is the reference's, operation by operation, in the
compute dtype (float32 for bf16/fp16 params); sums are accumulated in double.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import warnings

import torch

__all__ = ["load_kernel", "kernel_buildable", "KERNEL_SOURCE"]

KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlockRows = 32;   // rows summed in the compute dtype before a double flush
constexpr int64_t kGrainElems = 32768;

struct Hyper {
  double lr, weight_decay, beta1, beta2, beta3, eps1, eps2, clip;
  bool maximize;
  bool lr_is_tensor;  // decay as the reference: -wd * (p * lr), lr rounded to p's dtype
};

// The decay factor of p += factor * p: the reference multiplies by -wd * lr (a Python float,
// rounded once) for a float lr, and by lr cast to the param's dtype for a tensor lr.
template <typename param_t, typename acc_t>
inline acc_t decay_factor(const Hyper& h) {
  if (h.lr_is_tensor) return acc_t(-h.weight_decay) * acc_t(param_t(acc_t(h.lr)));
  return acc_t(-h.weight_decay * h.lr);
}

// Per-thread accumulator slots. Called from inside an enclosing parallel region (tensors
// spread over threads), at::parallel_for runs inline and one slot is enough; otherwise each
// worker of the at::parallel_for uses the slot of its thread number. `nested` must be taken
// before at::parallel_for (inside its body every thread is "in a parallel region").
inline int thread_slots(bool nested) { return nested ? 1 : at::get_num_threads(); }
inline int thread_slot(bool nested) { return nested ? 0 : at::get_thread_num(); }

template <typename acc_t>
inline acc_t rsqrt_(acc_t x) { return acc_t(1) / std::sqrt(x); }

// Row sums (into row_sum[k]) and column sums (into col_sum[b*m + j]) of f(k, j) over a
// (B*n) x m matrix; f returns the compute-dtype value of one element and may write state.
template <typename acc_t, typename F>
void row_col_sums(int64_t B, int64_t n, int64_t m, std::vector<double>& row_sum,
                  std::vector<double>& col_sum, const F& f) {
  const int64_t N = B * n;
  const bool nested = at::in_parallel_region();
  const int nthreads = thread_slots(nested);
  std::vector<double> partial((size_t)nthreads * B * m, 0.0);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(m, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + (size_t)thread_slot(nested) * B * m;
    std::vector<acc_t> block(m);
    int64_t k = begin;
    while (k < end) {
      const int64_t b = k / n;
      const int64_t stop = std::min({end, (b + 1) * n, k + kBlockRows});
      std::fill(block.begin(), block.end(), acc_t(0));
      acc_t* blk = block.data();
      for (; k < stop; ++k) {
        row_sum[k] = f(k, blk);
      }
      double* cols = mine + b * m;
      for (int64_t j = 0; j < m; ++j) cols[j] += blk[j];
    }
  });
  col_sum.assign((size_t)B * m, 0.0);
  for (int t = 0; t < nthreads; ++t) {
    const double* src = partial.data() + (size_t)t * B * m;
    for (int64_t i = 0; i < B * m; ++i) col_sum[i] += src[i];
  }
}

// stat = beta * stat + (1 - beta) * sum / count, as the reference's mul_ then add_(alpha).
template <typename acc_t>
void ema_means(acc_t* stat, const std::vector<double>& sums, double count, double beta) {
  const acc_t b = acc_t(beta), a = acc_t(1.0 - beta);
  for (size_t i = 0; i < sums.size(); ++i) {
    const acc_t mean = acc_t(sums[i] / count);
    const acc_t scaled = stat[i] * b;
    stat[i] = scaled + a * mean;
  }
}

// row_factor[k] = rsqrt(row[k] / mean(row[b, :])), col_factor[i] = rsqrt(col[i]).
template <typename acc_t>
void factors(const acc_t* row, const acc_t* col, int64_t B, int64_t n, int64_t m,
             std::vector<acc_t>& row_factor, std::vector<acc_t>& col_factor) {
  row_factor.resize((size_t)B * n);
  col_factor.resize((size_t)B * m);
  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += row[b * n + i];
    const acc_t mean = acc_t(s / n);
    for (int64_t i = 0; i < n; ++i) row_factor[b * n + i] = rsqrt_<acc_t>(row[b * n + i] / mean);
  }
  for (int64_t i = 0; i < B * m; ++i) col_factor[i] = rsqrt_<acc_t>(col[i]);
}

// Pass 1 on one row: col_block[j] += G_j and return sum_j G_j, G = g^2 + eps1.
template <typename param_t, typename acc_t>
inline acc_t sq_row(const param_t* __restrict g, acc_t* __restrict col_block, const int64_t m,
                    const acc_t eps1) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) {
    const acc_t gv = acc_t(g[j]);
    const acc_t G = gv * gv + eps1;
    col_block[j] += G;
    s += G;
  }
  return s;
}

// Pass 2 on one row: sum_j u_j^2, u = (rf cf_j) g_j.
template <typename param_t, typename acc_t>
inline acc_t update_sq_row(const param_t* __restrict g, const acc_t* __restrict cf,
                           const acc_t rf, const int64_t m) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) {
    const acc_t u = (rf * cf[j]) * acc_t(g[j]);
    s += u * u;
  }
  return s;
}

// Pass 3 on one row: u_hat, m = b1 m + a1 u_hat, col_block[j] += U_j, return sum_j U_j.
template <typename param_t, typename acc_t, bool clip>
inline acc_t momentum_row(const param_t* __restrict g, acc_t* __restrict ea,
                          const acc_t* __restrict cf, const acc_t rf,
                          acc_t* __restrict col_block, const int64_t m, const acc_t sign,
                          const acc_t denom, const acc_t b1, const acc_t a1, const acc_t eps2) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) {
    const acc_t u0 = (rf * cf[j]) * (sign * acc_t(g[j]));
    const acc_t u = clip ? u0 / denom : u0;
    const acc_t mv = ea[j] * b1 + a1 * u;
    ea[j] = mv;
    const acc_t d = u - mv;
    const acc_t U = d * d + eps2;
    col_block[j] += U;
    s += U;
  }
  return s;
}

// Pass 4 on one row: p = p + decay p (rounded to param_t), p -= lr (Rf Cf_j) m_j.
template <typename param_t, typename acc_t>
inline void param_row(param_t* __restrict p, const acc_t* __restrict ea,
                      const acc_t* __restrict Cf, const acc_t Rf, const int64_t m,
                      const acc_t lr, const acc_t decay, const bool has_decay) {
  if (has_decay) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const acc_t pv = acc_t(p[j]);
      const acc_t decayed = acc_t(param_t(pv + decay * pv));
      p[j] = param_t(decayed - ((Rf * Cf[j]) * ea[j]) * lr);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      p[j] = param_t(acc_t(p[j]) - ((Rf * Cf[j]) * ea[j]) * lr);
    }
  }
}

// Passes 1 and 2 of a factored (B, n, m) tensor, shared by both kernels: r, c and their
// factors rf, cf (row_sum/col_sum are scratch for later passes); returns the clip divisor.
template <typename param_t, typename acc_t>
acc_t factored_second_moment(const param_t* g, int64_t B, int64_t n, int64_t m,
                             at::Tensor& row, at::Tensor& col, const Hyper& h,
                             std::vector<double>& row_sum, std::vector<double>& col_sum,
                             std::vector<acc_t>& rf, std::vector<acc_t>& cf) {
  const int64_t N = B * n;
  const acc_t eps1 = acc_t(h.eps1);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / m);
  // pass 1: G = g^2 + eps1 -> r, c
  row_col_sums<acc_t>(B, n, m, row_sum, col_sum, [=](int64_t k, acc_t* __restrict blk) {
    return sq_row<param_t, acc_t>(g + k * m, blk, m, eps1);
  });
  ema_means<acc_t>(row.data_ptr<acc_t>(), row_sum, double(m), h.beta2);
  ema_means<acc_t>(col.data_ptr<acc_t>(), col_sum, double(n), h.beta2);
  factors<acc_t>(row.data_ptr<acc_t>(), col.data_ptr<acc_t>(), B, n, m, rf, cf);

  // pass 2: sum u^2, u = (rf cf) g
  const bool nested = at::in_parallel_region();
  const int nthreads = thread_slots(nested);
  std::vector<double> sq(nthreads * 8, 0.0);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    double acc = 0;
    for (int64_t k = begin; k < end; ++k) {
      acc += update_sq_row<param_t, acc_t>(g + k * m, cf.data() + (k / n) * m, rf[k], m);
    }
    sq[thread_slot(nested) * 8] += acc;
  });
  double sumsq = 0;
  for (int t = 0; t < nthreads; ++t) sumsq += sq[t * 8];
  const acc_t rms = acc_t(std::sqrt(sumsq)) / acc_t(std::sqrt(double(N * m)));
  return std::max(rms / acc_t(h.clip), acc_t(1));
}

// Pass 1 of a vector, shared by both kernels: v = b2 v + (1 - b2) (g^2 + eps1), and the clip
// divisor from sum u^2, u = g / sqrt(v).
template <typename param_t, typename acc_t>
acc_t full_second_moment(const param_t* g, acc_t* v, int64_t numel, const Hyper& h) {
  const acc_t eps1 = acc_t(h.eps1), b2 = acc_t(h.beta2), a2 = acc_t(1.0 - h.beta2);
  const acc_t sign = h.maximize ? acc_t(-1) : acc_t(1);
  const bool nested = at::in_parallel_region();
  const int nthreads = thread_slots(nested);
  std::vector<double> sq(nthreads * 8, 0.0);
  at::parallel_for(0, numel, kGrainElems, [&](int64_t begin, int64_t end) {
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = begin; i < end; ++i) {
      const acc_t gv = sign * acc_t(g[i]);
      const acc_t G = gv * gv + eps1;
      const acc_t vv = v[i] * b2 + a2 * G;
      v[i] = vv;
      const acc_t u = (acc_t(1) / std::sqrt(vv)) * gv;
      s += u * u;
    }
    sq[thread_slot(nested) * 8] += s;
  });
  double sumsq = 0;
  for (int t = 0; t < nthreads; ++t) sumsq += sq[t * 8];
  const acc_t rms = acc_t(std::sqrt(sumsq)) / acc_t(std::sqrt(double(numel)));
  return std::max(rms / acc_t(h.clip), acc_t(1));
}

template <typename param_t, typename acc_t>
void factored_one(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                  at::Tensor& row, at::Tensor& col, at::Tensor& res_row, at::Tensor& res_col,
                  const Hyper& h) {
  const int64_t m = param.size(-1), n = param.size(-2);
  const int64_t B = param.numel() / (n * m), N = B * n;
  param_t* p = param.data_ptr<param_t>();
  const param_t* g = grad.data_ptr<param_t>();
  acc_t* ea = exp_avg.data_ptr<acc_t>();
  const acc_t eps2 = acc_t(h.eps2);
  const acc_t sign = h.maximize ? acc_t(-1) : acc_t(1);
  std::vector<double> row_sum(N), col_sum;
  std::vector<acc_t> rf, cf, Rf, Cf;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / m);

  const acc_t denom = factored_second_moment<param_t, acc_t>(g, B, n, m, row, col, h, row_sum,
                                                            col_sum, rf, cf);

  // pass 3: u_hat, m, U = (u_hat - m)^2 + eps2 -> R, C
  const acc_t b1 = acc_t(h.beta1), a1 = acc_t(1.0 - h.beta1);
  const acc_t* rfp = rf.data();
  const acc_t* cfp = cf.data();
  if (denom == acc_t(1)) {  // no clipping: skip the division (x / 1 == x exactly)
    row_col_sums<acc_t>(B, n, m, row_sum, col_sum, [=](int64_t k, acc_t* __restrict blk) {
      return momentum_row<param_t, acc_t, false>(g + k * m, ea + k * m, cfp + (k / n) * m,
                                                 rfp[k], blk, m, sign, denom, b1, a1, eps2);
    });
  } else {
    row_col_sums<acc_t>(B, n, m, row_sum, col_sum, [=](int64_t k, acc_t* __restrict blk) {
      return momentum_row<param_t, acc_t, true>(g + k * m, ea + k * m, cfp + (k / n) * m,
                                                rfp[k], blk, m, sign, denom, b1, a1, eps2);
    });
  }
  ema_means<acc_t>(res_row.data_ptr<acc_t>(), row_sum, double(m), h.beta3);
  ema_means<acc_t>(res_col.data_ptr<acc_t>(), col_sum, double(n), h.beta3);
  factors<acc_t>(res_row.data_ptr<acc_t>(), res_col.data_ptr<acc_t>(), B, n, m, Rf, Cf);

  // pass 4: p -= lr * wd * p; p -= lr * (Rf Cf) m
  const acc_t lr = acc_t(h.lr);
  const acc_t decay = decay_factor<param_t, acc_t>(h);
  const bool has_decay = h.weight_decay != 0;
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      param_row<param_t, acc_t>(p + k * m, ea + k * m, Cf.data() + (k / n) * m, Rf[k], m, lr,
                                decay, has_decay);
    }
  });
}

template <typename param_t, typename acc_t>
void full_one(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
              at::Tensor& exp_avg_sq, const Hyper& h) {
  const int64_t numel = param.numel();
  param_t* p = param.data_ptr<param_t>();
  const param_t* g = grad.data_ptr<param_t>();
  acc_t* ea = exp_avg.data_ptr<acc_t>();
  acc_t* v = exp_avg_sq.data_ptr<acc_t>();
  const acc_t sign = h.maximize ? acc_t(-1) : acc_t(1);
  const acc_t denom = full_second_moment<param_t, acc_t>(g, v, numel, h);
  const acc_t b1 = acc_t(h.beta1), a1 = acc_t(1.0 - h.beta1);
  const acc_t lr = acc_t(h.lr);
  const acc_t decay = decay_factor<param_t, acc_t>(h);
  const bool has_decay = h.weight_decay != 0;
  at::parallel_for(0, numel, kGrainElems, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const acc_t u = ((acc_t(1) / std::sqrt(v[i])) * (sign * acc_t(g[i]))) / denom;
      const acc_t mv = ea[i] * b1 + a1 * u;
      ea[i] = mv;
      acc_t pv = acc_t(p[i]);
      if (has_decay) pv = acc_t(param_t(pv + decay * pv));
      p[i] = param_t(pv - mv * lr);
    }
  });
}

// ------------------------------------------------------------------ low-memory variants
// Momentum stored as bf16 or block-wise int8 (codes + one float32 absmax per block), and
// bf16/fp16 weights rounded stochastically. The float32 m of this step is never stored at
// full size: pass 3 decodes the old m row by row to compute the instability sums, and pass
// 4 decodes it again, recomputes the new m (the same float32 operations, so the same bits),
// updates the weight and re-encodes m a block at a time. Extra memory stays O(rows + cols)
// plus one block per thread.

struct Momentum {
  float* f = nullptr;              // float32 storage (small int8-mode tensors)
  c10::BFloat16* h = nullptr;      // bf16 storage
  int8_t* q = nullptr;             // int8 codes
  float* absmax = nullptr;         // int8 scales, one per block
  int64_t block = 256;             // elements per int8 block
  int64_t unit() const { return q ? block : 4096; }
};

Momentum momentum_of(at::Tensor& exp_avg, at::Tensor& absmax, int64_t block) {
  Momentum M;
  M.block = block;
  switch (exp_avg.scalar_type()) {
    case at::kFloat: M.f = exp_avg.data_ptr<float>(); break;
    case at::kBFloat16: M.h = exp_avg.data_ptr<c10::BFloat16>(); break;
    case at::kChar:
      TORCH_CHECK(absmax.defined() && absmax.numel() == (exp_avg.numel() + block - 1) / block,
                  "torchcame fused kernel: int8 momentum needs one absmax per block");
      M.q = exp_avg.data_ptr<int8_t>();
      M.absmax = absmax.data_ptr<float>();
      break;
    default: TORCH_CHECK(false, "torchcame fused kernel: unsupported momentum dtype ",
                         exp_avg.scalar_type());
  }
  return M;
}

// out[0 .. e-s) = m[s .. e), as float32 (dequantized: code * (absmax / 127), as torch does).
inline void decode(const Momentum& M, int64_t s, int64_t e, float* __restrict out) {
  if (M.f) {
    std::copy(M.f + s, M.f + e, out);
  } else if (M.h) {
    for (int64_t i = s; i < e; ++i) out[i - s] = float(M.h[i]);
  } else {
    int64_t i = s;
    while (i < e) {
      const int64_t blk = i / M.block;
      const int64_t stop = std::min(e, (blk + 1) * M.block);
      const float scale = M.absmax[blk] / 127.0f;
      const int8_t* __restrict q = M.q;
#pragma omp simd
      for (int64_t t = i; t < stop; ++t) out[t - s] = float(q[t]) * scale;
      i = stop;
    }
  }
}

// m[s .. e) = in[0 .. e-s); for int8, [s, e) is whole blocks (the last one may be short):
// absmax per block, codes = clamp(round_half_even(x * (127 / absmax)), -127, 127).
inline void encode(const Momentum& M, int64_t s, int64_t e, const float* __restrict in) {
  if (M.f) {
    std::copy(in, in + (e - s), M.f + s);
  } else if (M.h) {
    for (int64_t i = s; i < e; ++i) M.h[i] = c10::BFloat16(in[i - s]);
  } else {
    for (int64_t b0 = s; b0 < e; b0 += M.block) {
      const int64_t b1 = std::min(e, b0 + M.block);
      float amax = 0.0f;
      for (int64_t t = b0; t < b1; ++t) amax = std::max(amax, std::fabs(in[t - s]));
      // as torch evaluates `127.0 / absmax` (Tensor.__rtruediv__: reciprocal, then multiply)
      const float inv = amax > 0.0f ? (1.0f / amax) * 127.0f : 0.0f;
      // round half to even as torch.round does: |x * inv| <= 127 (up to rounding) < 2^22,
      // where adding and subtracting 1.5 * 2^23 rounds to an integer in the FP rounding mode
      // (nearest even); unlike std::nearbyint, this vectorizes
      constexpr float kMagic = 12582912.0f;
      int8_t* __restrict q = M.q;
#pragma omp simd
      for (int64_t t = b0; t < b1; ++t) {
        const float c = (in[t - s] * inv + kMagic) - kMagic;
        q[t] = int8_t(int32_t(std::min(127.0f, std::max(-127.0f, c))));
      }
      M.absmax[b0 / M.block] = amax;
    }
  }
}

// 32 random bits for element i of a tensor: a 32-bit integer hash (Wellons' lowbias32) of
// the index mixed with a per-step, per-tensor seed. Counter-based, so results do not depend
// on the thread layout; branch-free, so the loops using it vectorize.
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline uint32_t random_bits(uint32_t seed, int64_t i) {
  const uint32_t key = uint32_t(i) ^ (uint32_t(uint64_t(i) >> 32) * 0x85ebca6bU);
  return hash32(key * 0x9E3779B9U + seed);
}

// x rounded to one of its two neighbours in T (bf16 or fp16) with probability proportional to
// closeness, so E[result] = x; the rule of torchcame.lowbit.stochastic_round_.
template <typename T>
inline T stochastic_round(float x, uint32_t bits) {
  const T nearest = T(x);
  const float near = float(nearest);
  if (!(x != near) || !std::isfinite(near)) return nearest;  // exact, NaN, or overflow
  const bool up = x > near;
  const uint16_t b = nearest.x;
  uint16_t ob;
  if ((b & 0x7fff) == 0) {
    ob = up ? 0x0001 : 0x8001;
  } else {
    ob = (up != bool(b & 0x8000)) ? uint16_t(b + 1) : uint16_t(b - 1);
  }
  const T other(ob, T::from_bits());
  const float of = float(other);
  if (!std::isfinite(of)) return nearest;
  const float p_other = (x - near) / (of - near);
  const float u = float(bits >> 8) * (1.0f / 16777216.0f);
  return u < p_other ? other : nearest;
}

// bf16 is the top half of a float32: adding 16 uniform random bits to the bottom half and
// truncating rounds the magnitude up with probability (distance to the lower neighbour) /
// (spacing) -- the same rule, without branches. Inf stays inf, NaN stays NaN (quiet). Above
// the largest bf16, as in torchcame.lowbit.stochastic_round_ (which never picks an infinite
// neighbour), the result is the round-to-nearest one: the largest bf16, or inf past half a
// spacing beyond it.
inline uint16_t stochastic_round_bf16_bits(float x, uint32_t bits) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  const bool special = (b & 0x7f800000U) == 0x7f800000U;
  const uint32_t up = b + (bits & 0xFFFFU);
  const bool overflow = (up & 0x7f800000U) == 0x7f800000U;
  const uint32_t nearest = b + 0x7FFFU + ((b >> 16) & 1U);  // round half to even
  const uint32_t quiet = (b & 0x007fffffU) ? 0x00400000U : 0U;
  return uint16_t((special ? (b | quiet) : (overflow ? nearest : up)) >> 16);
}

// p[0 .. len) = v[0 .. len) in param_t: rounded to nearest, or stochastically (element
// index base + t draws its own random bits).
template <typename param_t>
inline void store_params(param_t* __restrict p, const float* __restrict v, const int64_t len,
                         const bool sr, const uint32_t seed, const int64_t base) {
  if constexpr (std::is_same_v<param_t, float>) {
    std::copy(v, v + len, p);
  } else if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
    if (sr) {
      uint16_t* __restrict out = reinterpret_cast<uint16_t*>(p);
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) {
        out[t] = stochastic_round_bf16_bits(v[t], random_bits(seed, base + t));
      }
    } else {
      for (int64_t t = 0; t < len; ++t) p[t] = param_t(v[t]);
    }
  } else {
    if (sr) {
      for (int64_t t = 0; t < len; ++t) {
        p[t] = stochastic_round<param_t>(v[t], random_bits(seed, base + t));
      }
    } else {
      for (int64_t t = 0; t < len; ++t) p[t] = param_t(v[t]);
    }
  }
}

// The weight decay factor and whether the decayed weight is rounded to param_t first: with
// stochastic rounding the weight is float32 until its final (stochastic) rounding.
template <typename param_t>
inline float lowmem_decay_factor(const Hyper& h, bool sr) {
  return sr ? decay_factor<float, float>(h) : decay_factor<param_t, float>(h);
}

// Pass 3 on one row, momentum not written: sum and col_block of U = (u_hat - m_new)^2 + eps2.
template <typename param_t, bool clip>
inline float instability_row(const param_t* __restrict g, const float* __restrict old,
                             const float* __restrict cf, const float rf,
                             float* __restrict col_block, const int64_t m, const float sign,
                             const float denom, const float b1, const float a1,
                             const float eps2) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) {
    const float u0 = (rf * cf[j]) * (sign * float(g[j]));
    const float u = clip ? u0 / denom : u0;
    const float mv = old[j] * b1 + a1 * u;
    const float d = u - mv;
    const float U = d * d + eps2;
    col_block[j] += U;
    s += U;
  }
  return s;
}

template <typename param_t>
void factored_lowmem_one(at::Tensor& param, const at::Tensor& grad, const Momentum& M,
                         at::Tensor& row, at::Tensor& col, at::Tensor& res_row,
                         at::Tensor& res_col, const Hyper& h, bool sr, uint32_t seed) {
  const int64_t m = param.size(-1), n = param.size(-2);
  const int64_t B = param.numel() / (n * m), N = B * n;
  param_t* p = param.data_ptr<param_t>();
  const param_t* g = grad.data_ptr<param_t>();
  const float eps2 = float(h.eps2);
  const float sign = h.maximize ? -1.0f : 1.0f;
  std::vector<double> row_sum(N), col_sum;
  std::vector<float> rf, cf, Rf, Cf;

  const float denom = factored_second_moment<param_t, float>(g, B, n, m, row, col, h, row_sum,
                                                            col_sum, rf, cf);
  const bool clip = denom != 1.0f;

  // pass 3: decode the old m a row at a time -> the instability sums R, C
  const float b1 = float(h.beta1), a1 = float(1.0 - h.beta1);
  const float* rfp = rf.data();
  const float* cfp = cf.data();
  row_col_sums<float>(B, n, m, row_sum, col_sum, [=, &M](int64_t k, float* __restrict blk) {
    thread_local std::vector<float> old;
    old.resize(m);
    decode(M, k * m, (k + 1) * m, old.data());
    return clip ? instability_row<param_t, true>(g + k * m, old.data(), cfp + (k / n) * m,
                                                 rfp[k], blk, m, sign, denom, b1, a1, eps2)
                : instability_row<param_t, false>(g + k * m, old.data(), cfp + (k / n) * m,
                                                  rfp[k], blk, m, sign, denom, b1, a1, eps2);
  });
  ema_means<float>(res_row.data_ptr<float>(), row_sum, double(m), h.beta3);
  ema_means<float>(res_col.data_ptr<float>(), col_sum, double(n), h.beta3);
  factors<float>(res_row.data_ptr<float>(), res_col.data_ptr<float>(), B, n, m, Rf, Cf);

  // pass 4, a storage unit (int8 block) at a time: decode the old m, recompute the new m,
  // update the weight, encode the new m
  const float lr = float(h.lr);
  const float decay = lowmem_decay_factor<param_t>(h, sr);
  const bool has_decay = h.weight_decay != 0;
  const int64_t numel = N * m, unit = M.unit();
  const int64_t units = (numel + unit - 1) / unit;
  at::parallel_for(0, units, std::max<int64_t>(1, kGrainElems / unit), [&](int64_t ub,
                                                                          int64_t ue) {
    std::vector<float> buf(std::min(unit, numel)), pbuf(std::min(unit, numel));
    for (int64_t un = ub; un < ue; ++un) {
      const int64_t s = un * unit, e = std::min(numel, s + unit);
      decode(M, s, e, buf.data());
      int64_t i = s;
      while (i < e) {  // the part of row k inside this unit
        const int64_t k = i / m, j0 = i - k * m;
        const int64_t len = std::min(e, (k + 1) * m) - i;
        const int64_t cbase = (k / n) * m + j0;
        const float rfk = rf[k], Rfk = Rf[k];
        const float* __restrict cfr = cf.data() + cbase;
        const float* __restrict Cfr = Cf.data() + cbase;
        const param_t* __restrict gr = g + i;
        const param_t* __restrict pr = p + i;
        float* __restrict mb = buf.data() + (i - s);
        float* __restrict pb = pbuf.data() + (i - s);
        // one loop per case (decay rounded to param_t or not, clipping or not), so each
        // vectorizes; the arithmetic is the same in all
        auto row_loop = [&](auto decay_mode, auto clip_on) {
          constexpr int kDecay = decltype(decay_mode)::value;  // 0 none, 1 float, 2 rounded
          constexpr bool kClip = decltype(clip_on)::value;
#pragma omp simd
          for (int64_t t = 0; t < len; ++t) {
            const float u0 = (rfk * cfr[t]) * (sign * float(gr[t]));
            const float u = kClip ? u0 / denom : u0;
            const float mv = mb[t] * b1 + a1 * u;
            mb[t] = mv;
            float pv = float(pr[t]);
            if constexpr (kDecay == 1) pv = pv + decay * pv;
            if constexpr (kDecay == 2) pv = float(param_t(pv + decay * pv));
            pb[t] = pv - ((Rfk * Cfr[t]) * mv) * lr;
          }
        };
        using I0 = std::integral_constant<int, 0>;
        using I1 = std::integral_constant<int, 1>;
        using I2 = std::integral_constant<int, 2>;
        const int mode = !has_decay ? 0 : (sr || std::is_same_v<param_t, float>) ? 1 : 2;
        if (clip) {
          if (mode == 0) row_loop(I0{}, std::true_type{});
          else if (mode == 1) row_loop(I1{}, std::true_type{});
          else row_loop(I2{}, std::true_type{});
        } else {
          if (mode == 0) row_loop(I0{}, std::false_type{});
          else if (mode == 1) row_loop(I1{}, std::false_type{});
          else row_loop(I2{}, std::false_type{});
        }
        i += len;
      }
      store_params<param_t>(p + s, pbuf.data(), e - s, sr, seed, s);
      encode(M, s, e, buf.data());
    }
  });
}

template <typename param_t>
void full_lowmem_one(at::Tensor& param, const at::Tensor& grad, const Momentum& M,
                     at::Tensor& exp_avg_sq, const Hyper& h, bool sr, uint32_t seed) {
  const int64_t numel = param.numel();
  param_t* p = param.data_ptr<param_t>();
  const param_t* g = grad.data_ptr<param_t>();
  float* v = exp_avg_sq.data_ptr<float>();
  const float sign = h.maximize ? -1.0f : 1.0f;
  const float denom = full_second_moment<param_t, float>(g, v, numel, h);
  const float b1 = float(h.beta1), a1 = float(1.0 - h.beta1);
  const float lr = float(h.lr);
  const float decay = lowmem_decay_factor<param_t>(h, sr);
  const bool has_decay = h.weight_decay != 0;
  const int64_t unit = M.unit();
  const int64_t units = (numel + unit - 1) / unit;
  at::parallel_for(0, units, std::max<int64_t>(1, kGrainElems / unit), [&](int64_t ub,
                                                                          int64_t ue) {
    std::vector<float> buf(std::min(unit, numel)), pbuf(std::min(unit, numel));
    for (int64_t un = ub; un < ue; ++un) {
      const int64_t s = un * unit, e = std::min(numel, s + unit);
      decode(M, s, e, buf.data());
      float* __restrict mb = buf.data();
      float* __restrict pb = pbuf.data();
#pragma omp simd
      for (int64_t t = s; t < e; ++t) {
        const float u = ((1.0f / std::sqrt(v[t])) * (sign * float(g[t]))) / denom;
        const float mv = mb[t - s] * b1 + a1 * u;
        mb[t - s] = mv;
        float pv = float(p[t]);
        if (has_decay) pv = sr ? pv + decay * pv : float(param_t(pv + decay * pv));
        pb[t - s] = pv - mv * lr;
      }
      store_params<param_t>(p + s, pb, e - s, sr, seed, s);
      encode(M, s, e, mb);
    }
  });
}

Hyper make_hyper(const at::Tensor& lr, bool lr_is_tensor, double weight_decay,
                 std::vector<double> betas, std::vector<double> eps, double clip,
                 bool maximize) {
  TORCH_CHECK(lr.numel() == 1 && lr.device().is_cpu(), "lr must be a 1-element CPU tensor");
  return Hyper{lr.to(at::kDouble).item<double>(), weight_decay, betas[0], betas[1], betas[2],
               eps[0], eps[1], clip, maximize, lr_is_tensor};
}

}  // namespace

template <typename Fn>
void for_each_tensor(const std::vector<at::Tensor>& params, const Fn& step_one) {
  // Tensors big enough to keep every thread busy are stepped one at a time, parallel over
  // rows; the others are spread over threads whole (largest first, dynamic schedule), which
  // avoids a barrier per pass per small tensor.
  const int nthreads = at::get_num_threads();
  int64_t total = 0;
  for (const auto& p : params) total += p.numel();
  std::vector<int64_t> small;
  for (size_t i = 0; i < params.size(); ++i) {
    if (nthreads > 1 && params[i].numel() * 4 * nthreads < total) {
      small.push_back((int64_t)i);
    } else {
      step_one(i);
    }
  }
  std::stable_sort(small.begin(), small.end(), [&](int64_t a, int64_t b) {
    return params[a].numel() > params[b].numel();
  });
  const int64_t count = (int64_t)small.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t i = 0; i < count; ++i) step_one((size_t)small[i]);
}

void check_dtypes(const std::vector<at::Tensor>& params) {
  for (const auto& p : params) {
    const auto t = p.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
                "torchcame fused kernel: unsupported dtype ", t);
  }
}

void factored_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                   std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> rows,
                   std::vector<at::Tensor> cols, std::vector<at::Tensor> res_rows,
                   std::vector<at::Tensor> res_cols, at::Tensor lr, bool lr_is_tensor,
                   double weight_decay, std::vector<double> betas, std::vector<double> eps,
                   double clip, bool maximize) {
  const Hyper h = make_hyper(lr, lr_is_tensor, weight_decay, betas, eps, clip, maximize);
  check_dtypes(params);
  for_each_tensor(params, [&](size_t i) {
    auto& p = params[i];
    auto& g = grads[i];
    auto& e = exp_avgs[i];
    switch (p.scalar_type()) {
      case at::kFloat:
        factored_one<float, float>(p, g, e, rows[i], cols[i], res_rows[i], res_cols[i], h);
        break;
      case at::kDouble:
        factored_one<double, double>(p, g, e, rows[i], cols[i], res_rows[i], res_cols[i], h);
        break;
      case at::kBFloat16:
        factored_one<c10::BFloat16, float>(p, g, e, rows[i], cols[i], res_rows[i],
                                           res_cols[i], h);
        break;
      default:
        factored_one<c10::Half, float>(p, g, e, rows[i], cols[i], res_rows[i], res_cols[i],
                                       h);
    }
  });
}

void full_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
               std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
               at::Tensor lr, bool lr_is_tensor, double weight_decay, std::vector<double> betas,
               std::vector<double> eps, double clip, bool maximize) {
  const Hyper h = make_hyper(lr, lr_is_tensor, weight_decay, betas, eps, clip, maximize);
  check_dtypes(params);
  for_each_tensor(params, [&](size_t i) {
    auto& p = params[i];
    switch (p.scalar_type()) {
      case at::kFloat:
        full_one<float, float>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], h);
        break;
      case at::kDouble:
        full_one<double, double>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], h);
        break;
      case at::kBFloat16:
        full_one<c10::BFloat16, float>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], h);
        break;
      default:
        full_one<c10::Half, float>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], h);
    }
  });
}

void check_lowmem_dtypes(const std::vector<at::Tensor>& params) {
  for (const auto& p : params) {
    const auto t = p.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
                "torchcame fused kernel: unsupported dtype for low-memory options ", t);
  }
}

inline uint32_t tensor_seed(int64_t seed, size_t i) {
  return hash32(uint32_t(seed) ^ hash32(uint32_t(uint64_t(seed) >> 32) + uint32_t(i)));
}

void factored_step_lowmem(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                          std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> absmaxes,
                          std::vector<at::Tensor> rows, std::vector<at::Tensor> cols,
                          std::vector<at::Tensor> res_rows, std::vector<at::Tensor> res_cols,
                          at::Tensor lr, bool lr_is_tensor, double weight_decay,
                          std::vector<double> betas, std::vector<double> eps, double clip,
                          bool maximize, int64_t block_size, bool stochastic_rounding,
                          int64_t seed) {
  const Hyper h = make_hyper(lr, lr_is_tensor, weight_decay, betas, eps, clip, maximize);
  check_lowmem_dtypes(params);
  for_each_tensor(params, [&](size_t i) {
    const Momentum M = momentum_of(exp_avgs[i], absmaxes[i], block_size);
    const uint32_t s = tensor_seed(seed, i);
    auto& p = params[i];
    switch (p.scalar_type()) {
      case at::kFloat:
        factored_lowmem_one<float>(p, grads[i], M, rows[i], cols[i], res_rows[i], res_cols[i],
                                   h, false, s);
        break;
      case at::kBFloat16:
        factored_lowmem_one<c10::BFloat16>(p, grads[i], M, rows[i], cols[i], res_rows[i],
                                           res_cols[i], h, stochastic_rounding, s);
        break;
      default:
        factored_lowmem_one<c10::Half>(p, grads[i], M, rows[i], cols[i], res_rows[i],
                                       res_cols[i], h, stochastic_rounding, s);
    }
  });
}

void full_step_lowmem(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                      std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> absmaxes,
                      std::vector<at::Tensor> exp_avg_sqs, at::Tensor lr, bool lr_is_tensor,
                      double weight_decay, std::vector<double> betas, std::vector<double> eps,
                      double clip, bool maximize, int64_t block_size, bool stochastic_rounding,
                      int64_t seed) {
  const Hyper h = make_hyper(lr, lr_is_tensor, weight_decay, betas, eps, clip, maximize);
  check_lowmem_dtypes(params);
  for_each_tensor(params, [&](size_t i) {
    const Momentum M = momentum_of(exp_avgs[i], absmaxes[i], block_size);
    const uint32_t s = tensor_seed(seed, i);
    auto& p = params[i];
    switch (p.scalar_type()) {
      case at::kFloat:
        full_lowmem_one<float>(p, grads[i], M, exp_avg_sqs[i], h, false, s);
        break;
      case at::kBFloat16:
        full_lowmem_one<c10::BFloat16>(p, grads[i], M, exp_avg_sqs[i], h, stochastic_rounding,
                                       s);
        break;
      default:
        full_lowmem_one<c10::Half>(p, grads[i], M, exp_avg_sqs[i], h, stochastic_rounding, s);
    }
  });
}
"""

_module = None
_failure: str | None = None


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


_log = logging.getLogger("torchcame")

#: Seconds the last build took (``None`` when the kernel came from the cache).
last_build_seconds: float | None = None


def _build_name() -> tuple[str, list[str]]:
    capability, vector_flags = _vector_flags()
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", *vector_flags]
    key = hashlib.sha1((KERNEL_SOURCE + " ".join(cflags) + torch.__version__).encode())
    return f"torchcame_fused_{capability.lower()}_{key.hexdigest()[:12]}", cflags


def _cached(name: str) -> bool:
    """Whether a built module of this name is in torch's extension cache."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return os.path.exists(os.path.join(_get_build_directory(name, False), f"{name}.so"))
    except Exception:
        return False


def kernel_buildable() -> bool:
    """Whether the kernel is loaded, cached, or a C++ compiler is on ``PATH`` (no building)."""
    if _module is not None:
        return True
    if _failure is not None or os.environ.get("TORCHCAME_NO_KERNEL"):
        return False
    compiler = os.environ.get("CXX", "c++")
    return _cached(_build_name()[0]) or shutil.which(compiler) is not None


def load_kernel(verbose: bool = False):
    """The compiled kernel module, or ``None`` if it cannot be built (reason in a warning).

    The environment variable ``TORCHCAME_NO_KERNEL=1`` disables the kernel (the fused path
    then runs the multi-tensor path).
    """
    global _module, _failure, last_build_seconds
    if _module is not None or _failure is not None:
        return _module
    if os.environ.get("TORCHCAME_NO_KERNEL"):
        _failure = "disabled by TORCHCAME_NO_KERNEL"
        return None
    name, cflags = _build_name()
    cached = _cached(name)
    if not cached:
        _log.warning("torchcame: building the fused CPU kernel %s (one time, about a minute; "
                     "cached afterwards; fused=False skips it)", name)
    start = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline(
            name=name,
            cpp_sources=[KERNEL_SOURCE],
            functions=["factored_step", "full_step", "factored_step_lowmem", "full_step_lowmem"],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            verbose=verbose or bool(os.environ.get("TORCHCAME_VERBOSE_BUILD")),
        )
        if not cached:
            last_build_seconds = time.perf_counter() - start
            _log.warning("torchcame: fused CPU kernel built in %.0f s", last_build_seconds)
    except Exception as exc:  # no compiler, no headers, ...
        _failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        warnings.warn(
            "torchcame: could not build the fused CPU kernel (" + _failure + "); "
            "fused=True falls back to the multi-tensor (foreach) path",
            RuntimeWarning,
            stacklevel=3,
        )
    return _module
