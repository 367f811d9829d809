// The fused CAME step on CPU: the whole rule in a few passes over memory, no full-size
// temporaries. Compiled just in time by torchcame._impl.cpu_kernel (one build per source,
// flags and CPU vector capability, cached per user).
//
// Two kernel families, one template each, instantiated per param dtype and per momentum
// storage: in place (the compute dtype) or decoded/encoded (bf16 or int8, chosen at run time):
//
// Factored tensors, shape (B, n, m) (the factored dims last, leading dims flattened), in four
// passes over rows, parallel over rows with at::parallel_for:
//   1. read g: row sums and (per-thread) column sums of G = g^2 + eps1 -> r, c, and the
//      factors rsqrt(r / mean(r)), rsqrt(c) (vectors of length n and m);
//   2. read g: sum u^2 with u = (rf_i cf_j) g * update_scale -> the RMS clip divisor;
//   3. read g and m: u_hat, the new m, row/column sums of U = (u_hat - m)^2 + eps2 -> R, C
//      and their factors. Momentum in the compute dtype is written here; bf16/int8 momentum
//      is decoded a row at a time and not written;
//   4. a storage unit at a time (4096 elements, or one int8 block): read m (bf16/int8: decode
//      it and recompute this step's m from g -- the same float32 operations, so the same
//      bits -- then encode it), read/write p: weight decay and
//      p -= lr * ((Rf_i Cf_j) m * step_scale), rounded to the param dtype to nearest or
//      stochastically.
//   Bytes per element, P = param/grad size, M = momentum size (4 for float32, 2 for bf16,
//   1 + 4/block for int8): momentum in the compute dtype 5P + 3M (float32: 32 B);
//   bf16/int8 momentum 6P + 3M (bf16 params, int8 momentum with 256-blocks: about 15 B).
//
// Vectors, scalars and unfactored tensors, flattened, in two passes:
//   1. read g, read/write v: v = b2 v + (1 - b2) (g^2 + eps1), and sum u^2 with
//      u = rsqrt(v) g * update_scale -> the RMS clip divisor;
//   2. a storage unit at a time: read v and g, read/write m (decoded/encoded when low-bit),
//      read/write p: p -= lr * (m * step_scale).
//   Bytes per element, V = the second moment's size: 4P + 3V + 2M (float32: 36 B).
//
// Extra memory: O(threads * B m + B n) doubles for the row/column sums, four factor vectors,
// per thread one row of the compute dtype (two for low-bit momentum) and, in pass 4, one
// storage unit of float32 for a low-bit momentum and one for weights rounded stochastically
// (bound: torchcame._impl.cpu_kernel.kernel_workspace_bytes). u, U and S_hat exist only
// element by element. The math is the reference's, operation by operation, in the compute
// dtype; only the order of the row/column sums differs (blocks of 32 rows, double sums).
//
// bias correction (update_scale, step_scale) and the layout (momentum format, block size)
// are given per tensor by the caller; nothing is inferred from dtypes except the param's own.

#include "came_cpu.h"

#ifdef TORCHCAME_PASS_TIMING
#include <chrono>
#endif

namespace torchcame {
namespace {

#ifdef TORCHCAME_PASS_TIMING
// A development aid, not in the package's build: benchmarks/pass_timing.py compiles the kernel
// with -DTORCHCAME_PASS_TIMING to read the seconds spent in each pass of the factored family.
double pass_seconds[4] = {0, 0, 0, 0};
inline double pass_clock() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
#define TORCHCAME_PASS_START(mark) const double mark = pass_clock()
#define TORCHCAME_PASS_END(index, mark) pass_seconds[index] += pass_clock() - mark
#else
#define TORCHCAME_PASS_START(mark)
#define TORCHCAME_PASS_END(index, mark)
#endif

// ------------------------------------------------------------------------ factored family

struct FactoredTensors {
  at::Tensor param, grad, exp_avg, exp_avg_absmax, row, col, res_row, res_col;
};

// Pass 3 on one row: u_hat, the new m (written to momentum_row), and the instability
// U = (u_hat - m)^2 + eps2 added to col_block; returns sum_j U_j.
template <typename param_t, typename acc_t, bool kClip>
inline acc_t momentum_instability_row(const param_t* __restrict g, acc_t* __restrict momentum,
                                      const acc_t* __restrict col_factor,
                                      const acc_t row_factor, acc_t* __restrict col_block,
                                      const int64_t m, const acc_t sign,
                                      const acc_t update_scale, const acc_t divisor,
                                      const acc_t beta1, const acc_t one_minus_beta1,
                                      const acc_t eps2) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < m; ++j) {
    const acc_t update = clipped_update<acc_t, kClip>(row_factor * col_factor[j],
                                                      sign * acc_t(g[j]), update_scale, divisor);
    const acc_t new_momentum = momentum[j] * beta1 + one_minus_beta1 * update;
    momentum[j] = new_momentum;
    const acc_t deviation = update - new_momentum;
    const acc_t instability = deviation * deviation + eps2;
    col_block[j] += instability;
    sum += instability;
  }
  return sum;
}

template <typename param_t, typename acc_t, bool kInPlace>
void factored_tensor_step(FactoredTensors& t, const Hyper& h, const TensorSettings& o) {
  using Store = MomentumStore<acc_t, kInPlace>;
  const int64_t m = t.param.size(-1), n = t.param.size(-2);
  const int64_t B = t.param.numel() / (n * m), rows = B * n, numel = rows * m;
  param_t* p = t.param.data_ptr<param_t>();
  const param_t* g = t.grad.data_ptr<param_t>();
  const Store store(o.format, t.exp_avg, t.exp_avg_absmax, o.block_size);
  const acc_t sign = h.maximize ? acc_t(-1) : acc_t(1);
  const acc_t update_scale = acc_t(o.update_scale);
  const int64_t row_grain = std::max<int64_t>(1, kGrainElems / m);
  std::vector<double> row_sum(rows), col_sum;

  // pass 1: G = g^2 + eps1 -> r, c and their factors
  TORCHCAME_PASS_START(pass1_start);
  const acc_t eps1 = acc_t(h.eps1);
  row_col_sums<acc_t>(B, n, m, row_sum, col_sum, [=](int64_t k, acc_t* __restrict col_block) {
    const param_t* __restrict g_row = g + k * m;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < m; ++j) {
      const acc_t grad = acc_t(g_row[j]);
      const acc_t squared = grad * grad + eps1;
      col_block[j] += squared;
      sum += squared;
    }
    return sum;
  });
  Factors<acc_t> second_moment;
  second_moment.update(t.row, t.col, row_sum, col_sum, h.beta2, B, n, m);
  const acc_t* rf = second_moment.row.data();
  const acc_t* cf = second_moment.col.data();

  TORCHCAME_PASS_END(0, pass1_start);

  // pass 2: sum u^2 -> the clip divisor
  TORCHCAME_PASS_START(pass2_start);
  const double sum_sq = parallel_sum(rows, row_grain, [=](int64_t begin, int64_t end) {
    double total = 0;
    for (int64_t k = begin; k < end; ++k) {
      const param_t* __restrict g_row = g + k * m;
      const acc_t* __restrict cf_row = cf + (k / n) * m;
      const acc_t rf_k = rf[k];
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < m; ++j) {
        const acc_t update = ((rf_k * cf_row[j]) * acc_t(g_row[j])) * update_scale;
        sum += update * update;
      }
      total += sum;
    }
    return total;
  });
  const acc_t divisor = clip_divisor<acc_t>(sum_sq, numel, h);
  const bool clip = divisor != acc_t(1);

  TORCHCAME_PASS_END(1, pass2_start);

  // pass 3: u_hat, m, U -> R, C and their factors
  TORCHCAME_PASS_START(pass3_start);
  const acc_t beta1 = acc_t(h.beta1), one_minus_beta1 = acc_t(1.0 - h.beta1);
  const acc_t eps2 = acc_t(h.eps2);
  with_flag(clip, [&](auto clip_flag) {
    constexpr bool kClip = decltype(clip_flag)::value;
    row_col_sums<acc_t>(B, n, m, row_sum, col_sum, [=](int64_t k, acc_t* __restrict col_block) {
      acc_t* momentum_row;
      if constexpr (kInPlace) {
        momentum_row = store.values + k * m;
      } else {
        thread_local std::vector<float> decoded_row;
        decoded_row.resize(m);
        store.decode(k * m, (k + 1) * m, decoded_row.data());
        momentum_row = decoded_row.data();  // this step's m is recomputed in pass 4
      }
      return momentum_instability_row<param_t, acc_t, kClip>(
          g + k * m, momentum_row, cf + (k / n) * m, rf[k], col_block, m, sign, update_scale,
          divisor, beta1, one_minus_beta1, eps2);
    });
  });
  Factors<acc_t> confidence;
  confidence.update(t.res_row, t.res_col, row_sum, col_sum, h.beta3, B, n, m);
  const acc_t* Rf = confidence.row.data();
  const acc_t* Cf = confidence.col.data();

  TORCHCAME_PASS_END(2, pass3_start);

  // pass 4, a storage unit at a time: m (decoded and recomputed when low-bit), the weight,
  // m encoded back
  TORCHCAME_PASS_START(pass4_start);
  const WeightRule<acc_t> rule = weight_rule<param_t, acc_t>(h, o);
  auto weight_pass = [&](auto decay_flag, auto stochastic_flag, auto clip_flag) {
    constexpr bool kDecay = decltype(decay_flag)::value;
    constexpr bool kStochastic = decltype(stochastic_flag)::value;
    constexpr bool kClip = decltype(clip_flag)::value;
    for_each_storage_unit<param_t, acc_t, kInPlace, kStochastic>(
        store, p, numel, o.seed, [&](int64_t s, int64_t e, acc_t* momentum, acc_t* weights) {
          int64_t i = s;
          while (i < e) {  // the part of row k inside this unit
            const int64_t k = i / m, col_offset = (k / n) * m + (i - k * m);
            const int64_t len = std::min(e, (k + 1) * m) - i;
            const param_t* __restrict g_part = g + i;
            param_t* __restrict p_part = p + i;
            acc_t* __restrict m_part = momentum + (i - s);
            acc_t* __restrict w_part = kStochastic ? weights + (i - s) : nullptr;
            const acc_t* __restrict cf_part = cf + col_offset;
            const acc_t* __restrict Cf_part = Cf + col_offset;
            const acc_t rf_k = rf[k], Rf_k = Rf[k];
            if constexpr (!kInPlace) {  // this step's m, as pass 3 computed it
#pragma omp simd
              for (int64_t j = 0; j < len; ++j) {
                const acc_t update = clipped_update<acc_t, kClip>(
                    rf_k * cf_part[j], sign * acc_t(g_part[j]), update_scale, divisor);
                m_part[j] = m_part[j] * beta1 + one_minus_beta1 * update;
              }
            }
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) {
              const acc_t delta = (Rf_k * Cf_part[j]) * m_part[j];
              const acc_t weight = new_weight<param_t, acc_t, kDecay, kStochastic>(
                  p_part[j], delta, rule);
              if constexpr (kStochastic) {
                w_part[j] = weight;
              } else {
                p_part[j] = param_t(weight);
              }
            }
            i += len;
          }
        });
  };
  with_flag(h.weight_decay != 0, [&](auto decay_flag) {
    with_stochastic_flag<param_t>(o.stochastic_rounding, [&](auto stochastic_flag) {
      if constexpr (kInPlace) {  // the clip flag only matters where m is recomputed
        weight_pass(decay_flag, stochastic_flag, std::false_type{});
      } else {
        with_flag(clip, [&](auto clip_flag) {
          weight_pass(decay_flag, stochastic_flag, clip_flag);
        });
      }
    });
  });
  TORCHCAME_PASS_END(3, pass4_start);
}

// -------------------------------------------------------------------------- vector family

struct VectorTensors {
  at::Tensor param, grad, exp_avg, exp_avg_absmax, exp_avg_sq;
};

template <typename param_t, typename acc_t, bool kInPlace>
void vector_tensor_step(VectorTensors& t, const Hyper& h, const TensorSettings& o) {
  using Store = MomentumStore<acc_t, kInPlace>;
  const int64_t numel = t.param.numel();
  param_t* p = t.param.data_ptr<param_t>();
  const param_t* g = t.grad.data_ptr<param_t>();
  acc_t* v = t.exp_avg_sq.data_ptr<acc_t>();
  const Store store(o.format, t.exp_avg, t.exp_avg_absmax, o.block_size);
  const acc_t sign = h.maximize ? acc_t(-1) : acc_t(1);
  const acc_t update_scale = acc_t(o.update_scale);

  // pass 1: v = b2 v + (1 - b2) (g^2 + eps1); sum u^2 -> the clip divisor
  const acc_t eps1 = acc_t(h.eps1), beta2 = acc_t(h.beta2), one_minus_beta2 = acc_t(1.0 - h.beta2);
  const double sum_sq = parallel_sum(numel, kGrainElems, [=](int64_t begin, int64_t end) {
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = begin; i < end; ++i) {
      const acc_t grad = sign * acc_t(g[i]);
      const acc_t squared = grad * grad + eps1;
      const acc_t second_moment = v[i] * beta2 + one_minus_beta2 * squared;
      v[i] = second_moment;
      const acc_t update = ((acc_t(1) / std::sqrt(second_moment)) * grad) * update_scale;
      sum += update * update;
    }
    return double(sum);
  });
  const acc_t divisor = clip_divisor<acc_t>(sum_sq, numel, h);

  // pass 2, a storage unit at a time: u_hat, m, the weight
  const acc_t beta1 = acc_t(h.beta1), one_minus_beta1 = acc_t(1.0 - h.beta1);
  const WeightRule<acc_t> rule = weight_rule<param_t, acc_t>(h, o);
  auto update_pass = [&](auto decay_flag, auto stochastic_flag) {
    constexpr bool kDecay = decltype(decay_flag)::value;
    constexpr bool kStochastic = decltype(stochastic_flag)::value;
    for_each_storage_unit<param_t, acc_t, kInPlace, kStochastic>(
        store, p, numel, o.seed,
        [&](int64_t s, int64_t e, acc_t* __restrict momentum, acc_t* __restrict weights) {
#pragma omp simd
          for (int64_t i = s; i < e; ++i) {
            // always divided by the clip divisor (1 when not clipping: exact)
            const acc_t update = clipped_update<acc_t, true>(
                acc_t(1) / std::sqrt(v[i]), sign * acc_t(g[i]), update_scale, divisor);
            const acc_t new_momentum = momentum[i - s] * beta1 + one_minus_beta1 * update;
            momentum[i - s] = new_momentum;
            const acc_t weight = new_weight<param_t, acc_t, kDecay, kStochastic>(
                p[i], new_momentum, rule);
            if constexpr (kStochastic) {
              weights[i - s] = weight;
            } else {
              p[i] = param_t(weight);
            }
          }
        });
  };
  with_flag(h.weight_decay != 0, [&](auto decay_flag) {
    with_stochastic_flag<param_t>(o.stochastic_rounding, [&](auto stochastic_flag) {
      update_pass(decay_flag, stochastic_flag);
    });
  });
}

// ------------------------------------------------------------------------------- dispatch

template <typename T>
struct TypeTag {
  using type = T;
};

// step(TypeTag<param_t>, TypeTag<acc_t>, std::bool_constant<in_place>) for the tensor's param
// dtype and its (given) momentum format: in place for the compute format, decoded/encoded for
// bf16 and int8. float64 params support the compute format only.
template <typename Step>
void dispatch(at::ScalarType param_dtype, MomentumFormat format, const Step& step) {
  const bool in_place = format == MomentumFormat::kCompute;
  auto float32_math = [&](auto param_tag) {
    with_flag(in_place, [&](auto in_place_flag) {
      step(param_tag, TypeTag<float>{}, in_place_flag);
    });
  };
  switch (param_dtype) {
    case at::kDouble:
      return step(TypeTag<double>{}, TypeTag<double>{}, std::true_type{});
    case at::kFloat:
      return float32_math(TypeTag<float>{});
    case at::kBFloat16:
      return float32_math(TypeTag<c10::BFloat16>{});
    default:
      return float32_math(TypeTag<c10::Half>{});
  }
}

// Steps tensors big enough to keep every thread busy one at a time, parallel over rows; the
// others are spread over threads whole (largest first, dynamic schedule), which avoids a
// barrier per pass per small tensor.
template <typename StepOne>
void for_each_tensor(const std::vector<at::Tensor>& params, const StepOne& step_one) {
  const int nthreads = at::get_num_threads();
  int64_t total = 0;
  for (const auto& param : params) total += param.numel();
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

at::ScalarType compute_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_tensor(const at::Tensor& tensor, at::ScalarType dtype, int64_t numel,
                  const char* what, size_t i) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.is_contiguous(), "torchcame CPU kernel: ",
              what, " of tensor ", i, " must be a contiguous CPU tensor");
  TORCH_CHECK(tensor.scalar_type() == dtype, "torchcame CPU kernel: ", what, " of tensor ", i,
              " is ", tensor.scalar_type(), ", the layout needs ", dtype);
  TORCH_CHECK(tensor.numel() == numel, "torchcame CPU kernel: ", what, " of tensor ", i,
              " has ", tensor.numel(), " elements, expected ", numel);
}

// Checks param, grad and momentum of every tensor against its layout (before anything is
// written); returns each tensor's settings.
std::vector<TensorSettings> check_call(const Hyper& h, const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avgs,
                      const std::vector<at::Tensor>& exp_avg_absmaxes,
                      const std::vector<int64_t>& momentum_formats,
                      const std::vector<int64_t>& block_sizes,
                      const std::vector<double>& update_scales,
                      const std::vector<double>& step_scales) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count &&
                  exp_avg_absmaxes.size() == count && momentum_formats.size() == count &&
                  block_sizes.size() == count && update_scales.size() == count &&
                  step_scales.size() == count,
              "torchcame CPU kernel: one entry per tensor in every list");
  std::vector<TensorSettings> settings(count);
  for (size_t i = 0; i < count; ++i) {
    const at::ScalarType dtype = params[i].scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                    dtype == at::kHalf,
                "torchcame CPU kernel: unsupported param dtype ", dtype);
    const int64_t numel = params[i].numel();
    check_tensor(params[i], dtype, numel, "param", i);
    check_tensor(grads[i], dtype, numel, "grad", i);
    const int64_t format_code = momentum_formats[i];
    TORCH_CHECK(format_code >= 0 && format_code <= 2,
                "torchcame CPU kernel: unknown momentum format ", format_code);
    const auto format = static_cast<MomentumFormat>(format_code);
    TORCH_CHECK(format == MomentumFormat::kCompute || dtype != at::kDouble,
                "torchcame CPU kernel: float64 params keep their momentum in float64");
    const int64_t block = block_sizes[i];
    if (format == MomentumFormat::kCompute) {
      check_tensor(exp_avgs[i], compute_dtype(dtype), numel, "exp_avg", i);
    } else if (format == MomentumFormat::kBFloat16) {
      check_tensor(exp_avgs[i], at::kBFloat16, numel, "exp_avg", i);
    } else {
      TORCH_CHECK(block > 0, "torchcame CPU kernel: int8 block size must be positive");
      check_tensor(exp_avgs[i], at::kChar, numel, "exp_avg", i);
      check_tensor(exp_avg_absmaxes[i], at::kFloat, (numel + block - 1) / block,
                   "exp_avg_absmax", i);
    }
    settings[i].format = format;
    settings[i].update_scale = update_scales[i];
    settings[i].step_scale = step_scales[i];
    settings[i].block_size = block;
    settings[i].stochastic_rounding =
        h.stochastic_rounding && (dtype == at::kBFloat16 || dtype == at::kHalf);
    settings[i].seed = tensor_seed(h.seed, i);
  }
  return settings;
}

// --------------------------------------------------------------------------- entry points

// One step of factored tensors; statistics refer to (B, n, m) = (leading dims, the two
// factored dims), each given last and contiguous. Lists hold one entry per tensor.
void factored_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                   std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_absmaxes,
                   std::vector<at::Tensor> rows, std::vector<at::Tensor> cols,
                   std::vector<at::Tensor> res_rows, std::vector<at::Tensor> res_cols,
                   std::vector<int64_t> momentum_formats, std::vector<int64_t> block_sizes,
                   std::vector<double> update_scales, std::vector<double> step_scales,
                   const Hyper& h) {
  const std::vector<TensorSettings> settings =
      check_call(h, params, grads, exp_avgs, exp_avg_absmaxes, momentum_formats, block_sizes,
                 update_scales, step_scales);
  TORCH_CHECK(rows.size() == params.size() && cols.size() == params.size() &&
                  res_rows.size() == params.size() && res_cols.size() == params.size(),
              "torchcame CPU kernel: one entry per tensor in every list");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].dim() >= 2 && params[i].numel() > 0,
                "torchcame CPU kernel: factored tensors have >= 2 dims and elements");
    const int64_t m = params[i].size(-1), n = params[i].size(-2);
    const int64_t B = params[i].numel() / (n * m);
    const at::ScalarType stat_dtype = compute_dtype(params[i].scalar_type());
    check_tensor(rows[i], stat_dtype, B * n, "exp_avg_sq_row", i);
    check_tensor(cols[i], stat_dtype, B * m, "exp_avg_sq_col", i);
    check_tensor(res_rows[i], stat_dtype, B * n, "exp_avg_res_row", i);
    check_tensor(res_cols[i], stat_dtype, B * m, "exp_avg_res_col", i);
  }
  for_each_tensor(params, [&](size_t i) {
    FactoredTensors tensors{params[i], grads[i], exp_avgs[i], exp_avg_absmaxes[i],
                            rows[i],   cols[i],  res_rows[i], res_cols[i]};
    dispatch(params[i].scalar_type(), settings[i].format, [&](auto param, auto acc, auto in_place) {
      factored_tensor_step<typename decltype(param)::type, typename decltype(acc)::type,
                           decltype(in_place)::value>(tensors, h, settings[i]);
    });
  });
}

// One step of vectors, scalars and unfactored tensors (a full second moment), flattened.
void vector_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                 std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_absmaxes,
                 std::vector<at::Tensor> exp_avg_sqs, std::vector<int64_t> momentum_formats,
                 std::vector<int64_t> block_sizes, std::vector<double> update_scales,
                 std::vector<double> step_scales, const Hyper& h) {
  const std::vector<TensorSettings> settings =
      check_call(h, params, grads, exp_avgs, exp_avg_absmaxes, momentum_formats, block_sizes,
                 update_scales, step_scales);
  TORCH_CHECK(exp_avg_sqs.size() == params.size(),
              "torchcame CPU kernel: one entry per tensor in every list");
  for (size_t i = 0; i < params.size(); ++i) {
    check_tensor(exp_avg_sqs[i], compute_dtype(params[i].scalar_type()), params[i].numel(),
                 "exp_avg_sq", i);
  }
  for_each_tensor(params, [&](size_t i) {
    if (params[i].numel() == 0) return;
    VectorTensors tensors{params[i], grads[i], exp_avgs[i], exp_avg_absmaxes[i], exp_avg_sqs[i]};
    dispatch(params[i].scalar_type(), settings[i].format, [&](auto param, auto acc, auto in_place) {
      vector_tensor_step<typename decltype(param)::type, typename decltype(acc)::type,
                         decltype(in_place)::value>(tensors, h, settings[i]);
    });
  });
}

}  // namespace
}  // namespace torchcame

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  using torchcame::Hyper;
  namespace py = pybind11;
  py::class_<Hyper>(module, "Hyper", "One param group's hyperparameters.")
      .def(py::init<>())
      .def_readwrite("lr", &Hyper::lr)
      .def_readwrite("weight_decay", &Hyper::weight_decay)
      .def_readwrite("beta1", &Hyper::beta1)
      .def_readwrite("beta2", &Hyper::beta2)
      .def_readwrite("beta3", &Hyper::beta3)
      .def_readwrite("eps1", &Hyper::eps1)
      .def_readwrite("eps2", &Hyper::eps2)
      .def_readwrite("clip_threshold", &Hyper::clip_threshold)
      .def_readwrite("maximize", &Hyper::maximize)
      .def_readwrite("lr_is_tensor", &Hyper::lr_is_tensor)
      .def_readwrite("stochastic_rounding", &Hyper::stochastic_rounding)
      .def_readwrite("seed", &Hyper::seed);
  module.def("factored_step", &torchcame::factored_step,
             "One CAME step of factored tensors (see came_cpu.cpp).");
  module.def("vector_step", &torchcame::vector_step,
             "One CAME step of vectors and unfactored tensors (see came_cpu.cpp).");
#ifdef TORCHCAME_PASS_TIMING
  module.def("pass_times", [] {
    std::vector<double> out(torchcame::pass_seconds, torchcame::pass_seconds + 4);
    for (double& t : torchcame::pass_seconds) t = 0;
    return out;
  }, "Seconds in passes 1-4 of the factored family since the last call (then reset).");
#endif
}
