// batch_norm_act's statistics: per-channel sums of (x - shift) and of its squares, read
// only. Two passes make a stable variance (shift 0 for the mean, then the mean): each
// fixed block of the tensor sums in opmath with kLanes accumulators, and the blocks'
// partials add up in double in a fixed order, so the result does not depend on the
// thread count. Included by activations_cpu.cpp alone (run_chunk's target copies).
#pragma once

#include <cstdint>

#include "half_convert.h"
#include "isa.h"

namespace fusedact {
namespace {

// Sums of d = x[i] - shift and d^2 over a run of n elements of one channel.
template <typename scalar_t>
struct RunSumsLoop {
  static constexpr int kLanes = 16;
  using T = opmath_t<scalar_t>;

  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, int64_t n, T shift, double* out) {
    T s1[kLanes] = {}, s2[kLanes] = {};
    const int64_t nv = n - n % kLanes;
    for (int64_t i = 0; i < nv; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const T d = load(x, i + l) - shift;
        s1[l] += d;
        s2[l] += d * d;
      }
    }
    for (int64_t i = nv; i < n; ++i) {
      const T d = load(x, i) - shift;
      s1[i - nv] += d;
      s2[i - nv] += d * d;
    }
    double a = 0, b = 0;
    for (int l = 0; l < kLanes; ++l) a += s1[l], b += s2[l];
    out[0] += a;
    out[1] += b;
  }
};

// Runs [b, e) of `inner` elements, run r of channel r % C: one call a task (a call per
// short run cost more than its sums). out[2 r], out[2 r + 1] += run r's sums.
template <typename scalar_t>
struct RunsSumsLoop {
  using T = opmath_t<scalar_t>;

  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, int64_t inner, int64_t C, const T* shift, int64_t b,
                                         int64_t e, double* out) {
    for (int64_t r = b; r < e; ++r)
      RunSumsLoop<scalar_t>::template run<kVector>(x + r * inner, inner, shift[r % C], out + 2 * r);
  }
};

// Sums per channel over rows [0, rows) of C channels (channels_last, (N, C)):
// out[2 c], out[2 c + 1] += the sums of d and d^2 of channel c.
template <typename scalar_t>
struct RowSumsLoop {
  using T = opmath_t<scalar_t>;

  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, int64_t rows, int64_t C, const T* shift, T* s1, T* s2,
                                         double* out) {
    for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = T(0);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* xr = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T d = load(xr, c) - shift[c];
        s1[c] += d;
        s2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      out[2 * c] += s1[c];
      out[2 * c + 1] += s2[c];
    }
  }
};

}  // namespace
}  // namespace fusedact
