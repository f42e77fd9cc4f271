// batch_norm_act's statistics: per-channel sums of d = x - shift and of d^2, read only.
// Two passes make a stable variance (the sums of x for the mean: kSquares false, then of
// d and d^2 about it): each fixed block of a channel's runs sums in opmath lanes, folded
// into double in lane order, and the blocks' sums add up in double in a fixed order, so
// the result does not depend on the thread count. Included by activations_cpu.cpp alone
// (run_chunk's target copies).
#pragma once

#include <cstdint>
#include <type_traits>

#include "half_convert.h"
#include "isa.h"
#include "loops.h"

namespace fusedact {
namespace {

// Elements a block of a short channel's runs (RunBlocks) sums before its lanes fold into
// double: at most 256 terms a float lane (as a 64x64 map's run had with a fold a run).
constexpr int64_t kStatsSegment = 4096;

// Sums of d and d^2 over `runs` runs of n elements of one channel, `stride` elements
// apart: the terms go into lanes from zero (ReduceBackwardLoop::run_lanes with
// math::BnMoments, the backward's vector accumulators), the lanes fold into double in
// lane order, and out[0], out[1] += the two. On 7x7 maps a fold a run took more time than
// the run's sums. kSquares false (the mean's pass): the sums of x alone (math::BnMean,
// bitwise BnMoments' first with shift 0) into out[0], `shift` unused.
template <typename scalar_t, bool kSquares>
struct MomentsLoop {
  using T = opmath_t<scalar_t>;
  static constexpr int kLanes = lanes_of<scalar_t>;

  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, int64_t stride, int64_t runs, int64_t n, T shift,
                                         double* out) {
    using Op = std::conditional_t<kSquares, math::BnMoments<T>, math::BnMean<T>>;
    Op op{};
    if constexpr (kSquares) {
      op.shift = shift;
    } else if constexpr (std::is_same_v<scalar_t, T>) {
      // BnMean's zero through a volatile: a constant folds x - 0 into x, and GCC then
      // copied x through the stack with the sums waiting on it (float32: the pass ~3x
      // slower); 16-bit data's widening leaves nothing to copy
      volatile T zero = 0;
      op.zero = zero;
    }
    T lanes[Op::kParams][kLanes] = {};
    for (int64_t r = 0; r < runs; ++r)
      ReduceBackwardLoop<Op, scalar_t>::template run_lanes<kVector>(x + r * stride, x + r * stride, nullptr, n, op,
                                                                    lanes);
    double a = 0;
    for (int l = 0; l < kLanes; ++l) a += lanes[0][l];
    out[0] += a;
    if constexpr (kSquares) {
      double b = 0;
      for (int l = 0; l < kLanes; ++l) b += lanes[1][l];
      out[1] += b;
    }
  }

  // block k of channel c's runs (RunBlocks over the [N R][C][inner] runs)
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void block(const scalar_t* x, const ChannelGeometry& geo, const RunBlocks& rb,
                                           int64_t c, int64_t k, T shift, double* out) {
    int64_t first, last;
    rb.runs(k, first, last);
    run<kVector>(x + (first * geo.C + c) * geo.inner, geo.C * geo.inner, last - first, geo.inner, shift, out);
  }
};

// Blocks [b, e) of the [C][RunBlocks::per_channel] order of short channels: block t's
// sums into out[2 t], out[2 t + 1]. One call a task.
template <typename scalar_t, bool kSquares>
struct BlocksSumsLoop {
  using T = opmath_t<scalar_t>;

  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, ChannelGeometry geo, RunBlocks rb, const T* shift,
                                         int64_t b, int64_t e, double* out) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t c = t / rb.per_channel;
      MomentsLoop<scalar_t, kSquares>::template block<kVector>(x, geo, rb, c, t % rb.per_channel,
                                                               kSquares ? shift[c] : T(0), out + 2 * t);
    }
  }
};

// Runs [b, e) of `inner` elements, run r of channel r % C, in memory order (a longer
// channel's): out[2 r], out[2 r + 1] += run r's sums. One call a task.
template <typename scalar_t, bool kSquares>
struct RunsSumsLoop {
  using T = opmath_t<scalar_t>;

  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, int64_t inner, int64_t C, const T* shift, int64_t b,
                                         int64_t e, double* out) {
    for (int64_t r = b; r < e; ++r)
      MomentsLoop<scalar_t, kSquares>::template run<kVector>(x + r * inner, 0, 1, inner, kSquares ? shift[r % C] : T(0),
                                                             out + 2 * r);
  }
};

// Sums per channel over rows [0, rows) of C channels (channels_last, (N, C)):
// out[2 c], out[2 c + 1] += the sums of d and d^2 of channel c. Each channel's sums go
// row by row in opmath whatever the path: where C is a multiple of kChannelChunk, a
// chunk at a time with its sums in registers; else in s1, s2, loaded and stored each
// row (C = 64 so summed at a third of NCHW's speed).
// Measurements: benchmarks/NOTES.md, "channels_last statistics in registers".
// kSquares false: the sums of x alone (the mean's pass) into out[2 c]; shift unused.
template <typename scalar_t, bool kSquares>
struct RowSumsLoop {
  using T = opmath_t<scalar_t>;

  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, int64_t rows, int64_t C, const T* shift, T* s1, T* s2,
                                         double* out) {
    constexpr int64_t W = kChannelChunk<kVector, T>;
    if (C % W == 0) {
      for (int64_t c0 = 0; c0 < C; c0 += W) {
        T a[W], q[W];
        sums<W>(x + c0, rows, C, kSquares ? shift + c0 : nullptr, W, a, q, out + 2 * c0);
      }
    } else {
      sums<0>(x, rows, C, shift, C, s1, s2, out);
    }
  }

  // Channels [0, n) of rows `stride` apart (kWidth > 0: n = kWidth, unrolled): a, q from
  // zero, then out[2 c], out[2 c + 1] += a[c], q[c].
  template <int64_t kWidth>
  static FUSEDACT_ALWAYS_INLINE void sums(const scalar_t* x, int64_t rows, int64_t stride, const T* shift, int64_t n,
                                          T* a, T* q, double* out) {
    const int64_t m = kWidth > 0 ? kWidth : n;
    for (int64_t c = 0; c < m; ++c) a[c] = q[c] = T(0);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* xr = x + r * stride;
#pragma omp simd
      for (int64_t c = 0; c < m; ++c) {
        if constexpr (kSquares) {
          const T d = load(xr, c) - shift[c];
          a[c] += d;
          q[c] += d * d;
        } else {
          a[c] += load(xr, c);
        }
      }
    }
    for (int64_t c = 0; c < m; ++c) {
      out[2 * c] += a[c];
      if constexpr (kSquares) out[2 * c + 1] += q[c];
    }
  }
};

// batch_norm_act's training forward for channels [b, e), each whole
// (CpuBackend::channel_train_forward): the channel's two sums passes in bn_stats' order
// (channel_sums' blocks, BlocksSumsLoop) and its arithmetic, the affine, then y over its
// runs (channel_forward's loop): the channel's x comes from memory once.
template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct ChannelTrainForwardLoop {
  using T = opmath_t<scalar_t>;
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, scalar_t* y, ChannelGeometry geo, RunBlocks rb,
                                         ParamView<P, NP> pv, BnTrainChannels<P> out, int64_t b, int64_t e,
                                         bool stream) {
    const int64_t C = geo.C, inner = geo.inner, NR = geo.N * geo.R, M = NR * inner;
    for (int64_t c = b; c < e; ++c) {
      double s[2];
      auto sums = [&](auto squares, T shift) FUSEDACT_LAMBDA_INLINE {
        s[0] = s[1] = 0;  // the blocks' sums added in order, as channel_sums adds them
        for (int64_t k = 0; k < rb.per_channel; ++k) {
          double block[2] = {0, 0};
          MomentsLoop<scalar_t, decltype(squares)::value>::template block<kVector>(x, geo, rb, c, k, shift, block);
          s[0] += block[0], s[1] += block[1];
        }
      };
      sums(std::false_type{}, T(0));  // the sums of x (the mean's pass)
      const T shift = bn_shift<T>(s[0], M);
      sums(std::true_type{}, shift);
      bn_channel_stats<T>(shift, s[0], s[1], M, out.mean[c], out.var[c]);
      const T inv = out.invstd[c] = bn_invstd<T>(out.var[c], out.eps);
      out.a[c] = out.weight ? out.weight[c] * inv : inv;
      out.b[c] = out.bias ? out.bias[c] : T(0);
      T v[NP];
      pv.load(0, c, v);  // mean, a, b just written, then the activation's
      const OpT<T> op = OpT<T>::from(v);
      for (int64_t nr = 0; nr < NR; ++nr) {
        const int64_t off = (nr * C + c) * inner;
        ForwardLoop<OpT<T>, scalar_t>::template run<kVector>(x + off, y + off, inner, op, stream);
      }
    }
  }
};

}  // namespace
}  // namespace fusedact
