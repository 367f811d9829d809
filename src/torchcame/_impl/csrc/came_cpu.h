// Building blocks of the fused CAME CPU kernel (came_cpu.cpp): hyperparameters, row/column
// reductions and their factors, the momentum storage formats, and the rounding of new
// weights. Every function here is shared by both kernel families (factored and vector).
//
// Conventions: `param_t` is the parameter's (and gradient's) dtype; `acc_t` is the compute
// dtype of the step's math and of every statistic (float32 for bf16/fp16/float32 params,
// double for double params). Sums over rows and columns are accumulated in double.
// Compiled with -ffp-contract=off: no fused multiply-adds, so every elementwise expression
// rounds exactly as written, in scalar and vector code alike.

#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace torchcame {

constexpr int64_t kBlockRows = 32;      // rows summed in the compute dtype before a double flush
constexpr int64_t kGrainElems = 32768;  // elements per at::parallel_for work item
constexpr int64_t kStorageUnit = 4096;  // elements per pass-4 unit (float32/bf16 momentum)

// ---------------------------------------------------------------------------- hyperparameters

// How m is stored between steps (torchcame.state.StateLayout.momentum).
enum class MomentumFormat : int64_t {
  kCompute = 0,   // the compute dtype: float32 (double for double params), updated in place
  kBFloat16 = 1,  // bf16, rounded to nearest
  kInt8 = 2,      // block-wise absmax int8: codes plus one float32 absmax per block
};

// One param group's hyperparameters (Python: torchcame._impl.cpu_kernel builds it).
struct Hyper {
  double lr = 0, weight_decay = 0, beta1 = 0, beta2 = 0, beta3 = 0, eps1 = 0, eps2 = 0;
  double clip_threshold = 1;
  bool maximize = false;
  bool lr_is_tensor = false;  // decay as the reference: -wd * (p * lr), lr rounded to p's dtype
  bool stochastic_rounding = false;
  int64_t seed = 0;  // of the stochastic rounding's counter-based random bits
};

// What differs between the tensors of one call.
struct TensorSettings {
  MomentumFormat format = MomentumFormat::kCompute;  // how m is stored
  double update_scale = 1;  // bias correction of u: sqrt(1 - beta2^t)
  double step_scale = 1;    // bias correction of the step: 1 / (1 - beta1^t) [* sqrt(1 - beta3^t)]
  int64_t block_size = 256;  // int8 momentum: elements per block
  bool stochastic_rounding = false;  // round the new weight stochastically (bf16/fp16 params)
  uint32_t seed = 0;                 // this tensor's random stream
};

// The decay factor of p += factor * p: the reference multiplies by -wd * lr (a Python float,
// rounded once) for a float lr, and by lr cast to the param's dtype for a tensor lr.
template <typename param_t, typename acc_t>
inline acc_t decay_factor(const Hyper& h) {
  if (h.lr_is_tensor) return acc_t(-h.weight_decay) * acc_t(param_t(acc_t(h.lr)));
  return acc_t(-h.weight_decay * h.lr);
}

// Calls body(std::true_type{}) or body(std::false_type{}): a runtime flag as a compile-time
// one, so each variant of a loop vectorizes without a branch inside.
template <typename Body>
inline void with_flag(bool flag, const Body& body) {
  if (flag) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// with_flag for stochastic rounding, which only bf16/fp16 params use: float32/float64 params
// get the false variant only.
template <typename param_t, typename Body>
inline void with_stochastic_flag(bool flag, const Body& body) {
  if constexpr (std::is_same_v<param_t, c10::BFloat16> || std::is_same_v<param_t, c10::Half>) {
    with_flag(flag, body);
  } else {
    body(std::false_type{});
  }
}

// ------------------------------------------------------------------------------- reductions

// Per-thread accumulator slots. Called from inside an enclosing parallel region (tensors
// spread over threads), at::parallel_for runs inline and one slot is enough; otherwise each
// worker of the at::parallel_for uses the slot of its thread number. `nested` must be taken
// before at::parallel_for (inside its body every thread is "in a parallel region").
inline int thread_slots(bool nested) { return nested ? 1 : at::get_num_threads(); }
inline int thread_slot(bool nested) { return nested ? 0 : at::get_thread_num(); }

// sum over i in [0, count) of term(begin, end) -> the partial sum of a range, in parallel;
// partial sums are added per thread, then over threads in thread order.
template <typename Term>
double parallel_sum(int64_t count, int64_t grain, const Term& term) {
  const bool nested = at::in_parallel_region();
  const int slots = thread_slots(nested);
  constexpr int kStride = 8;  // one cache line per slot
  std::vector<double> partial((size_t)slots * kStride, 0.0);
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    partial[(size_t)thread_slot(nested) * kStride] += term(begin, end);
  });
  double total = 0;
  for (int slot = 0; slot < slots; ++slot) total += partial[(size_t)slot * kStride];
  return total;
}

// Row sums (into row_sum[k]) and column sums (into col_sum[b*m + j]) of f(k, j) over a
// (B*n) x m matrix; row_term(k, col_block) adds row k's values to col_block[0 .. m) and
// returns their sum (it may write state).
template <typename acc_t, typename RowTerm>
void row_col_sums(int64_t B, int64_t n, int64_t m, std::vector<double>& row_sum,
                  std::vector<double>& col_sum, const RowTerm& row_term) {
  const int64_t rows = B * n;
  const bool nested = at::in_parallel_region();
  const int slots = thread_slots(nested);
  std::vector<double> partial((size_t)slots * B * m, 0.0);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(m, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + (size_t)thread_slot(nested) * B * m;
    std::vector<acc_t> block(m);
    int64_t k = begin;
    while (k < end) {
      const int64_t b = k / n;
      const int64_t stop = std::min({end, (b + 1) * n, k + kBlockRows});
      std::fill(block.begin(), block.end(), acc_t(0));
      acc_t* col_block = block.data();
      for (; k < stop; ++k) {
        row_sum[k] = row_term(k, col_block);
      }
      double* cols = mine + b * m;
      for (int64_t j = 0; j < m; ++j) cols[j] += col_block[j];
    }
  });
  col_sum.assign((size_t)B * m, 0.0);
  for (int slot = 0; slot < slots; ++slot) {
    const double* src = partial.data() + (size_t)slot * B * m;
    for (int64_t i = 0; i < B * m; ++i) col_sum[i] += src[i];
  }
}

// stat = beta * stat + (1 - beta) * sum / count, as the reference's mul_ then add_(alpha).
template <typename acc_t>
void ema_of_means(acc_t* stat, const std::vector<double>& sums, double count, double beta) {
  const acc_t keep = acc_t(beta), take = acc_t(1.0 - beta);
  for (size_t i = 0; i < sums.size(); ++i) {
    const acc_t mean = acc_t(sums[i] / count);
    const acc_t kept = stat[i] * keep;
    stat[i] = kept + take * mean;
  }
}

// The factors of the factored rsqrt: row_factor[k] = rsqrt(row[k] / mean(row[b, :])) and
// col_factor[i] = rsqrt(col[i]), so rsqrt(S_hat)[k, j] = row_factor[k] * col_factor[b*m + j].
template <typename acc_t>
struct Factors {
  std::vector<acc_t> row, col;

  // Updates a factored statistic (row_tensor, col_tensor) with the EMA of this pass's row and
  // column means (sums over m and n elements), then computes its factors.
  void update(at::Tensor& row_tensor, at::Tensor& col_tensor, const std::vector<double>& row_sum,
              const std::vector<double>& col_sum, double beta, int64_t B, int64_t n, int64_t m) {
    acc_t* row_stat = row_tensor.data_ptr<acc_t>();
    acc_t* col_stat = col_tensor.data_ptr<acc_t>();
    ema_of_means<acc_t>(row_stat, row_sum, double(m), beta);
    ema_of_means<acc_t>(col_stat, col_sum, double(n), beta);
    compute(row_stat, col_stat, B, n, m);
  }

  void compute(const acc_t* row_stat, const acc_t* col_stat, int64_t B, int64_t n, int64_t m) {
    row.resize((size_t)B * n);
    col.resize((size_t)B * m);
    for (int64_t b = 0; b < B; ++b) {
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += row_stat[b * n + i];
      const acc_t mean = acc_t(sum / n);
      for (int64_t i = 0; i < n; ++i) {
        row[b * n + i] = acc_t(1) / std::sqrt(row_stat[b * n + i] / mean);
      }
    }
    for (int64_t i = 0; i < B * m; ++i) col[i] = acc_t(1) / std::sqrt(col_stat[i]);
  }
};

// The RMS clip divisor max(1, RMS(u) / d) from sum u^2 over count elements.
template <typename acc_t>
inline acc_t clip_divisor(double sum_sq, int64_t count, const Hyper& h) {
  const acc_t rms = acc_t(std::sqrt(sum_sq)) / acc_t(std::sqrt(double(count)));
  return std::max(rms / acc_t(h.clip_threshold), acc_t(1));
}

// --------------------------------------------------------------------- elementwise rules

// u_hat for one element: u = (rsqrt(v_hat) * g) * update_scale, divided by the clip divisor
// when clipping is on (skipped when the divisor is 1: x / 1 == x exactly).
template <typename acc_t, bool kClip>
inline acc_t clipped_update(acc_t rsqrt_second_moment, acc_t signed_grad, acc_t update_scale,
                            acc_t divisor) {
  const acc_t update = (rsqrt_second_moment * signed_grad) * update_scale;
  return kClip ? update / divisor : update;
}

// ----------------------------------------------------------------------- momentum storage

// Access to one tensor's stored momentum. In the compute format (kInPlace) m is updated where
// it is stored. bf16 and int8 momentum (kInPlace false; which of the two is a runtime field,
// consulted once per row or unit) are decoded into and encoded from a float32 buffer, a
// storage unit at a time: an int8 block, or kStorageUnit elements of bf16.
template <typename acc_t, bool kInPlace>
struct MomentumStore {
  static_assert(kInPlace || std::is_same_v<acc_t, float>, "low-bit momentum is float32 math");

  MomentumFormat format;
  acc_t* values = nullptr;          // kCompute
  c10::BFloat16* bf16 = nullptr;    // kBFloat16
  int8_t* codes = nullptr;          // kInt8
  float* absmax = nullptr;          // kInt8, one per block
  int64_t block_size = 0;           // kInt8

  MomentumStore(MomentumFormat momentum_format, at::Tensor& exp_avg, at::Tensor& exp_avg_absmax,
                int64_t block)
      : format(momentum_format) {
    if constexpr (kInPlace) {
      values = exp_avg.data_ptr<acc_t>();
    } else if (format == MomentumFormat::kBFloat16) {
      bf16 = exp_avg.data_ptr<c10::BFloat16>();
    } else {
      codes = exp_avg.data_ptr<int8_t>();
      absmax = exp_avg_absmax.data_ptr<float>();
      block_size = block;
    }
  }

  // Elements per pass-4 unit; int8 units are whole blocks (so each is encoded at once).
  int64_t unit() const { return format == MomentumFormat::kInt8 ? block_size : kStorageUnit; }

  // out[0 .. e-s) = m[s .. e) in float32 (int8: code * (absmax / 127), as torch does).
  void decode(int64_t s, int64_t e, float* __restrict out) const {
    if (format == MomentumFormat::kBFloat16) {
      for (int64_t i = s; i < e; ++i) out[i - s] = float(bf16[i]);
      return;
    }
    int64_t i = s;
    while (i < e) {
      const int64_t block = i / block_size;
      const int64_t stop = std::min(e, (block + 1) * block_size);
      const float scale = absmax[block] / 127.0f;
      const int8_t* __restrict q = codes;
#pragma omp simd
      for (int64_t t = i; t < stop; ++t) out[t - s] = float(q[t]) * scale;
      i = stop;
    }
  }

  // m[s .. e) = in[0 .. e-s); for int8, [s, e) is whole blocks (the last one may be short):
  // absmax per block, codes = clamp(round_half_even(x * (127 / absmax)), -127, 127).
  void encode(int64_t s, int64_t e, const float* __restrict in) const {
    if (format == MomentumFormat::kBFloat16) {
      for (int64_t i = s; i < e; ++i) bf16[i] = c10::BFloat16(in[i - s]);
      return;
    }
    for (int64_t first = s; first < e; first += block_size) {
      const int64_t last = std::min(e, first + block_size);
      float block_absmax = 0.0f;
      for (int64_t t = first; t < last; ++t) {
        block_absmax = std::max(block_absmax, std::fabs(in[t - s]));
      }
      // as torch evaluates `127.0 / absmax` (Tensor.__rtruediv__: reciprocal, then multiply)
      const float inverse = block_absmax > 0.0f ? (1.0f / block_absmax) * 127.0f : 0.0f;
      // round half to even as torch.round does: |x * inverse| <= 127 (up to rounding) < 2^22,
      // where adding and subtracting 1.5 * 2^23 rounds to an integer in the FP rounding mode
      // (nearest even); unlike std::nearbyint, this vectorizes
      constexpr float kMagic = 12582912.0f;
      int8_t* __restrict q = codes;
#pragma omp simd
      for (int64_t t = first; t < last; ++t) {
        const float rounded = (in[t - s] * inverse + kMagic) - kMagic;
        q[t] = int8_t(int32_t(std::min(127.0f, std::max(-127.0f, rounded))));
      }
      absmax[first / block_size] = block_absmax;
    }
  }
};

// ---------------------------------------------------------------------- stochastic rounding

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

// The seed of the random stream of the i-th tensor of a call.
inline uint32_t tensor_seed(int64_t seed, size_t i) {
  return hash32(uint32_t(seed) ^ hash32(uint32_t(uint64_t(seed) >> 32) + uint32_t(i)));
}

// x rounded to one of its two neighbours in T (bf16 or fp16) with probability proportional to
// closeness, so E[result] = x; the rule of torchcame.lowbit.stochastic_round_.
template <typename T>
inline T stochastic_round(float x, uint32_t bits) {
  const T nearest = T(x);
  const float near = float(nearest);
  if (!(x != near) || !std::isfinite(near)) return nearest;  // exact, NaN, or overflow
  const bool up = x > near;
  const uint16_t nearest_bits = nearest.x;
  uint16_t other_bits;
  if ((nearest_bits & 0x7fff) == 0) {
    other_bits = up ? 0x0001 : 0x8001;
  } else {
    other_bits = (up != bool(nearest_bits & 0x8000)) ? uint16_t(nearest_bits + 1)
                                                     : uint16_t(nearest_bits - 1);
  }
  const T other(other_bits, T::from_bits());
  const float other_value = float(other);
  if (!std::isfinite(other_value)) return nearest;
  const float p_other = (x - near) / (other_value - near);
  const float uniform = float(bits >> 8) * (1.0f / 16777216.0f);
  return uniform < p_other ? other : nearest;
}

// bf16 is the top half of a float32: adding 16 uniform random bits to the bottom half and
// truncating rounds the magnitude up with probability (distance to the lower neighbour) /
// (spacing) -- the same rule, without branches. Inf stays inf, NaN stays NaN (quiet). Above
// the largest bf16, as in torchcame.lowbit.stochastic_round_ (which never picks an infinite
// neighbour), the result is the round-to-nearest one: the largest bf16, or inf past half a
// spacing beyond it.
inline uint16_t stochastic_round_bf16_bits(float x, uint32_t bits) {
  uint32_t x_bits;
  std::memcpy(&x_bits, &x, sizeof(x_bits));
  const bool special = (x_bits & 0x7f800000U) == 0x7f800000U;
  const uint32_t up = x_bits + (bits & 0xFFFFU);
  const bool overflow = (up & 0x7f800000U) == 0x7f800000U;
  const uint32_t nearest = x_bits + 0x7FFFU + ((x_bits >> 16) & 1U);  // round half to even
  const uint32_t quiet = (x_bits & 0x007fffffU) ? 0x00400000U : 0U;
  return uint16_t((special ? (x_bits | quiet) : (overflow ? nearest : up)) >> 16);
}

// p[0 .. len) = values[0 .. len) rounded stochastically to param_t (bf16 or fp16); element
// base + t draws its own random bits.
template <typename param_t>
inline void store_stochastic(param_t* __restrict p, const float* __restrict values,
                             const int64_t len, const uint32_t seed, const int64_t base) {
  if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
    uint16_t* __restrict out = reinterpret_cast<uint16_t*>(p);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      out[t] = stochastic_round_bf16_bits(values[t], random_bits(seed, base + t));
    }
  } else {
    for (int64_t t = 0; t < len; ++t) {
      p[t] = stochastic_round<param_t>(values[t], random_bits(seed, base + t));
    }
  }
}

// ------------------------------------------------------------------------ the weight pass

// The constants of the weight update p -= lr * (delta * step_scale), after decoupled decay.
template <typename acc_t>
struct WeightRule {
  acc_t lr, step_scale, decay;
};

template <typename param_t, typename acc_t>
WeightRule<acc_t> weight_rule(const Hyper& h, const TensorSettings& o) {
  // with stochastic rounding the decayed weight stays in the compute dtype (not rounded)
  const acc_t decay = o.stochastic_rounding ? decay_factor<acc_t, acc_t>(h)
                                            : decay_factor<param_t, acc_t>(h);
  return {acc_t(h.lr), acc_t(o.step_scale), decay};
}

// The new weight before rounding: decoupled weight decay (rounded to param_t first unless
// the weight stays in the compute dtype for stochastic rounding), then
// p - lr * (delta * step_scale).
template <typename param_t, typename acc_t, bool kDecay, bool kStochastic>
inline acc_t new_weight(param_t weight, acc_t delta, const WeightRule<acc_t>& rule) {
  acc_t value = acc_t(weight);
  if constexpr (kDecay) {
    value = kStochastic ? value + rule.decay * value
                        : acc_t(param_t(value + rule.decay * value));
  }
  return value - (delta * rule.step_scale) * rule.lr;
}

// The last pass of both kernel families: a tensor's elements a storage unit at a time, units
// in parallel. unit_body(s, e, momentum, weights) updates elements [s, e): momentum[0 .. e-s)
// is their m (the stored values when in place, else a decoded copy), and weights a buffer for
// the new weights when they are rounded stochastically (kStochastic), which happens after the
// body, as does encoding a low-bit m back.
template <typename param_t, typename acc_t, bool kInPlace, bool kStochastic, typename UnitBody>
void for_each_storage_unit(const MomentumStore<acc_t, kInPlace>& store, param_t* p,
                           int64_t numel, uint32_t seed, const UnitBody& unit_body) {
  const int64_t unit = store.unit(), units = (numel + unit - 1) / unit;
  const int64_t buffer_size = std::min(unit, numel);
  at::parallel_for(0, units, std::max<int64_t>(1, kGrainElems / unit), [&](int64_t first,
                                                                          int64_t last) {
    std::vector<acc_t> momentum_buffer(kInPlace ? 0 : buffer_size);
    std::vector<acc_t> weight_buffer(kStochastic ? buffer_size : 0);
    for (int64_t u = first; u < last; ++u) {
      const int64_t s = u * unit, e = std::min(numel, s + unit);
      acc_t* momentum_unit;
      if constexpr (kInPlace) {
        momentum_unit = store.values + s;
      } else {
        momentum_unit = momentum_buffer.data();
        store.decode(s, e, momentum_unit);
      }
      unit_body(s, e, momentum_unit, weight_buffer.data());
      if constexpr (kStochastic) {
        store_stochastic<param_t>(p + s, weight_buffer.data(), e - s, seed, s);
      }
      if constexpr (!kInPlace) store.encode(s, e, momentum_unit);
    }
  });
}

}  // namespace torchcame
