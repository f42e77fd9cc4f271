// The CPU chunk loops, each run through run_chunk for the instruction set in use: flat
// forward and backward, runs of one channel (NCHW-like), rows of C channels
// (channels_last), and the backward loops that sum their chunk's parameter gradients.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>

#include "../channel_layout.h"
#include "../ops_impl.h"
#include "half_convert.h"
#include "isa.h"
#include "stores.h"

namespace fusedact {
namespace {

// f(j) for j = 0 .. NP-1, each j a compile-time constant (std::integral_constant).
template <int NP, typename F>
FUSEDACT_ALWAYS_INLINE void for_each_param(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) {
    (f(std::integral_constant<int, J>{}), ...);
  }(std::make_integer_sequence<int, NP>{});
}

using math::kSums;
using math::kWrites;

template <class Act, template <typename> class Of>
struct IsOf : std::false_type {};
template <typename T, template <typename> class Of>
struct IsOf<Of<T>, Of> : std::true_type {};
// Whether Act is one of Acts<T>, whatever T.
template <class Act, template <typename> class... Acts>
constexpr bool kOneOf = (IsOf<Act, Acts>::value || ...);
// A BatchNorm op's activation (an op with `act`, or one with `bn`), void for other ops.
template <class Op, class = void>
struct BnActivation {
  using type = void;
};
template <class Op>
struct BnActivation<Op, std::void_t<decltype(Op::act)>> {
  using type = decltype(Op::act);
};
template <class Op>
struct BnActivation<Op, std::void_t<decltype(Op::bn)>> {
  using type = decltype(Op::bn.act);
};

// Whether a backward loop over runs of Op on scalar_t data asks for run_avx2_scheduled
// (isa.h): a BatchNorm + SiLU, Swish or hard-Swish pass on bfloat16, measured faster so
// on AVX2; float32 (slower where it streams from memory), float16, Mish, ACON-C,
// identity, rows of C (channels_last) and the plain activations were level or slower.
// Measurements: benchmarks/NOTES.md, "The backward's vectors interleaved".
template <class Act>
constexpr bool kInterleaves = kOneOf<Act, math::Silu, math::Swish, math::HardSwish>;
template <class Op, typename scalar_t>
constexpr bool kScheduledBackward =
    std::is_same_v<scalar_t, c10::BFloat16> && kInterleaves<typename BnActivation<Op>::type>;

// ---- chunk loops

// With kVector, every element goes through the vector code (stores.h, store_all): fewer
// than kWhole elements are copied into a zero-padded vector of kWhole (by masked loads,
// load_padded) and n of its results stored; float16 blocks end with kWhole at least.
template <int kVector, typename scalar_t, typename Run>
FUSEDACT_ALWAYS_INLINE bool run_padded(int64_t n, scalar_t* out, Run run, const scalar_t* a,
                                       const scalar_t* b = nullptr) {
  constexpr int64_t kW = kWhole<scalar_t>;
  if (kVector == 0 || n >= kW) return false;
  // 64 bytes each (16-bit data: kW elements are 32 bytes, and zeros after)
  alignas(64) scalar_t ap[64 / sizeof(scalar_t)], bp[64 / sizeof(scalar_t)], outp[kW];
  load_padded<kVector, 64>(ap, a, n, sizeof(scalar_t));
  if (b != nullptr) load_padded<kVector, 64>(bp, b, n, sizeof(scalar_t));
  run(opaque(ap), opaque(bp), opaque(outp));
  for (int64_t j = 0; j < kW; ++j)
    if (j < n) out[j] = outp[j];
  return true;
}

// The length of the F16C block from b: at most kB, and never leaving fewer than kWhole.
template <typename scalar_t>
FUSEDACT_ALWAYS_INLINE int64_t f16c_block(int64_t kB, int64_t b, int64_t n) {
  const int64_t m = std::min(kB, n - b), left = n - b - m;
  return left > 0 && left < kWhole<scalar_t> ? m - kWhole<scalar_t> : m;
}

// Activations whose BatchNorm forward ran slower through `unpacked` (below): their long
// math in place on the opmath block (Mish 1.05x, ACON-C 1.03x the time).
template <class Act>
constexpr bool kLongMath = kOneOf<Act, math::Mish, math::AconC>;
// A BatchNorm op's activation, or the op itself.
template <class Op>
using activation_of =
    std::conditional_t<std::is_void_v<typename BnActivation<Op>::type>, Op, typename BnActivation<Op>::type>;

#ifdef FUSEDACT_X86_PATHS
// Whether an elementwise loop of Op takes bfloat16 through `unpacked`: at AVX2, but for
// kLongMath's activations.
template <int kVector, typename scalar_t, class Op>
constexpr bool kUnpacks = kVector == 32 && std::is_same_v<scalar_t, c10::BFloat16> && !kLongMath<activation_of<Op>>;

// out[i] = f(a[i], b[i]) for n >= 16 bfloat16 elements at AVX2, cached stores: blocks of
// 16s widened and rounded in the unpacks' order (half_convert.h), f in place between,
// then the last n % 16 as the 16 that end at n, in order (elements computed twice get
// the same values). kTwo false: f's second argument is 0 and b is not read. An opmath
// block and a staged rounding as store_all's, with two shuffles fewer a 16.
// Measurements: benchmarks/NOTES.md, "bfloat16 widened by unpacks".
template <bool kTwo, typename F>
FUSEDACT_ALWAYS_INLINE void unpacked(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* out, int64_t n,
                                     F f) {
  constexpr int64_t kB = kBlockBytes / sizeof(c10::BFloat16);
  const int64_t n16 = n - n % 16;
  alignas(64) float ab[kB], bb[kTwo ? kB : 1];
  for (int64_t s = 0; s < n16; s += kB) {
    const int64_t m = std::min(kB, n16 - s);
    bf16_to_floats_interleaved(a + s, ab, m);
    if constexpr (kTwo) {
      bf16_to_floats_interleaved(b + s, bb, m);
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) ab[j] = f(ab[j], bb[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) ab[j] = f(ab[j], 0.0f);
    }
    floats_to_bf16_interleaved(ab, out + s, m);
  }
  if (const int64_t t = n - 16; n16 < n)
    store_all<true>(out + t, 16, false,
                    [&](int64_t j) FUSEDACT_LAMBDA_INLINE { return f(load(a + t, j), kTwo ? load(b + t, j) : 0.0f); });
}
#endif

template <class Op, typename scalar_t>
struct ForwardLoop {
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, scalar_t* y, int64_t n, Op op, bool stream) {
    if (run_padded<kVector>(
            n, y,
            [&](const scalar_t* xp, const scalar_t*, scalar_t* yp)
                FUSEDACT_LAMBDA_INLINE { whole<kVector>(xp, yp, opaque(kWhole<scalar_t>), op, false); },
            x))
      return;
    whole<kVector>(x, y, n, op, stream);
  }

  // n >= kWhole with kVector
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void whole(const scalar_t* x, scalar_t* y, int64_t n, Op op, bool stream) {
#ifdef FUSEDACT_X86_PATHS
    if constexpr (kUnpacks<kVector, scalar_t, Op>) {
      if (!stream)
        return unpacked<false>(x, x, y, n, [&](float v, float) FUSEDACT_LAMBDA_INLINE { return op.forward(v); });
    }
    if constexpr (kF16c<(kVector > 0), scalar_t>) {  // x in blocks converted with F16C
      constexpr int64_t kB = kBlockBytes / sizeof(scalar_t);
      alignas(64) float xb[kB];
      for (int64_t b = 0, m; b < n; b += m) {
        m = f16c_block<scalar_t>(kB, b, n);
        halves_to_floats(x + b, xb, m);
        store_all<(kVector > 0)>(y + b, m, stream, [&](int64_t j) FUSEDACT_LAMBDA_INLINE { return op.forward(xb[j]); });
      }
      return;
    }
#endif
    store_all<(kVector > 0)>(y, n, stream, [=](int64_t i) FUSEDACT_LAMBDA_INLINE { return op.forward(load(x, i)); });
  }
};

template <class Op, typename scalar_t>
struct BackwardLoop {
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t n, Op op,
                                         bool stream) {
    if (run_padded<kVector>(
            n, dx,
            [&](const scalar_t* gp, const scalar_t* xp, scalar_t* dxp)
                FUSEDACT_LAMBDA_INLINE { whole<kVector>(gp, xp, dxp, opaque(kWhole<scalar_t>), op, false); },
            g, x))
      return;
    whole<kVector>(g, x, dx, n, op, stream);
  }

  // n >= kWhole with kVector
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void whole(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t n, Op op,
                                           bool stream) {
#ifdef FUSEDACT_X86_PATHS
    if constexpr (kUnpacks<kVector, scalar_t, Op>) {
      if (!stream)
        return unpacked<true>(g, x, dx, n,
                              [&](float gv, float xv) FUSEDACT_LAMBDA_INLINE { return op.backward(gv, xv); });
    }
    if constexpr (kF16c<(kVector > 0), scalar_t>) {  // g and x in blocks converted with F16C
      constexpr int64_t kB = kBlockBytes / sizeof(scalar_t);
      alignas(64) float gb[kB], xb[kB];
      for (int64_t b = 0, m; b < n; b += m) {
        m = f16c_block<scalar_t>(kB, b, n);
        halves_to_floats(g + b, gb, m);
        halves_to_floats(x + b, xb, m);
        store_all<(kVector > 0)>(dx + b, m, stream,
                                 [&](int64_t j) FUSEDACT_LAMBDA_INLINE { return op.backward(gb[j], xb[j]); });
      }
      return;
    }
#endif
    store_all<(kVector > 0)>(dx, n, stream,
                             [=](int64_t i) FUSEDACT_LAMBDA_INLINE { return op.backward(load(g, i), load(x, i)); });
  }
};

// Lanes (independent accumulators) of the backward sums: 32 for 16-bit data (below).
template <typename scalar_t>
constexpr int lanes_of = sizeof(scalar_t) == 2 ? 32 : 16;

// kLanes partial sums (vector lanes) added in lane order: a run's or a block's total.
template <typename T, int kLanes>
FUSEDACT_ALWAYS_INLINE T fold_lanes(const T* lanes) {
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// to[l] += from[l], lane by lane: a block's lanes into a channel's (or a sample's).
template <typename T, int kLanes>
FUSEDACT_ALWAYS_INLINE void add_lanes(T* to, const T* from) {
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) to[l] += from[l];
}

// dx over a run with one set of parameters, and the run's sums of g * dy/dparam in
// kLanes independent accumulators (vector lanes): run_lanes() adds them lane by lane into
// the caller's lanes[NP][kLanes] (a block of runs, folded once: on short runs, 7x7 or
// 14x14, folding every run's 16 lanes took about a third of the backward); run() folds
// one run's into one sum a parameter.
// 32 lanes for 16-bit data: GCC picks one vector size for a loop, and 16 iterations of
// 16-bit loads gave 256-bit vectors for the float math too (half of AVX-512's width).
template <class Op, typename scalar_t>
struct ReduceBackwardLoop {
  static constexpr int NP = Op::kParams;
  static constexpr bool kScheduled = kScheduledBackward<Op, scalar_t>;
  static constexpr int kLanes = lanes_of<scalar_t>;
  using T = opmath_t<scalar_t>;

  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t n, Op op,
                                         T* sums) {
    if constexpr (!kSums<Op>) {
#ifdef FUSEDACT_X86_PATHS
      if constexpr (kUnpacks<kVector, scalar_t, Op> && kWrites<Op>) {  // dx alone: elementwise
        if (n >= 16)
          return unpacked<true>(g, x, dx, n, [&](float gv, float xv) FUSEDACT_LAMBDA_INLINE {
            T dp[NP];
            return op.backward(gv, xv, dp);
          });
      }
#endif
      run_lanes<kVector>(g, x, dx, n, op, static_cast<T(*)[kLanes]>(nullptr));  // sums may be null
    } else {
      T lanes[NP][kLanes] = {};
      run_lanes<kVector>(g, x, dx, n, op, lanes);
      for (int j = 0; j < NP; ++j) sums[j] = fold_lanes<T, kLanes>(lanes[j]);
    }
  }

  // A float16/bfloat16 dx is rounded in a second loop, as compute_block does (stores.h);
  // widening g and x in a loop of their own as well measured slower.
  static constexpr bool kStaged = kWrites<Op> && !std::is_same_v<scalar_t, T>;

  // kCount elements from i (run_lanes' main loop and its tail's whole vectors): dx
  // written, the terms of the sums into db[j][l].
  template <int kCount>
  static FUSEDACT_ALWAYS_INLINE void step(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t i, Op op,
                                          T (*db)[kCount]) {
    alignas(64) T vb[kCount];
#pragma omp simd
    for (int l = 0; l < kCount; ++l) {
      T dp[NP];
      const T v = op.backward(load(g, i + l), load(x, i + l), dp);
      if constexpr (kStaged) {
        vb[l] = v;
      } else if constexpr (kWrites<Op>) {
        store(dx, i + l, v);
      }
      if constexpr (kSums<Op>) for_each_param<NP>([&](auto j) { db[j][l] = dp[j]; });
    }
    if constexpr (kStaged) {
#pragma omp simd
      for (int l = 0; l < kCount; ++l) store(dx, i + l, vb[l]);
    }
  }

  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run_lanes(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t n, Op op,
                                               T (*lanes)[kLanes]) {
    // The accumulators as GCC vectors of the target's width (kParts of them a parameter):
    // values, so they stay in registers through the loop. As T[NP][kLanes] arrays GCC
    // kept some of them on the stack (a load, add and store each iteration bounding the
    // loop) once the lanes left it; vectors wider than the target's stay in memory.
    // Baseline x86-64 keeps the arrays. An accumulator from +0 is never -0, so adding
    // +0 to a lane leaves it as it was.
    // Measurements: benchmarks/NOTES.md, "Lanes folded once a block" and "The
    // statistics in blocks too, and the tail in vectors".
    constexpr int kBytes = kVector > 0 ? kVector : int(sizeof(T));
    constexpr int kW = kBytes / int(sizeof(T)), kParts = kLanes / kW;  // lanes a vector, vectors a parameter
    constexpr bool kVecAcc = kVector > 0 && kLanes % kW == 0;
    constexpr int kNP = NP > 0 ? NP : 1;
    typedef T V __attribute__((vector_size(kBytes)));
    using int_t = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
    typedef int_t VI __attribute__((vector_size(kBytes)));
    V vacc[kVecAcc ? kNP : 1][kVecAcc ? kParts : 1] = {};
    T acc[kVecAcc ? 1 : kNP][kVecAcc ? 1 : kLanes] = {};
    const int64_t nv = n - n % kLanes;
    for (int64_t i = 0; i < nv; i += kLanes) {
      alignas(64) T db[kNP][kLanes];
      step<kLanes>(g, x, dx, i, op, db);
      if constexpr (kSums<Op> && kVecAcc) {
        for_each_param<NP>([&](auto j) {
          for_each_param<kParts>([&](auto q) {
            V d;
            __builtin_memcpy(&d, db[j] + q * kW, sizeof(V));
            vacc[j][q] += d;
          });
        });
      } else if constexpr (kSums<Op>) {
        for (int j = 0; j < NP; ++j) add_lanes<T, kLanes>(acc[j], db[j]);
      }
    }
    // The tail of a pass that writes (dx), fewer than kLanes elements, computed as the
    // main loop computes a block: GCC's scalar epilogue rounds unlike it (stores.h,
    // store_all), and an element's dx would depend on its place. The block is the kLanes
    // elements that end with the tail (its element m at s + m), or, in a run shorter than
    // that, the tail copied into a zero-padded block (s = 0); element m's terms go to
    // lane m, the other lanes get +0 (an accumulator from +0 is never -0).
    if constexpr (kWrites<Op> && kVecAcc) {
      if (const int64_t r = n - nv; r > 0) {
        alignas(64) scalar_t gp[kLanes], xp[kLanes], dxp[kLanes];
        const bool window = n >= kLanes;
        const int64_t s = window ? kLanes - r : 0;
        if (!window) {
          load_padded<kVector, sizeof gp>(gp, g, n, sizeof(scalar_t));
          load_padded<kVector, sizeof xp>(xp, x, n, sizeof(scalar_t));
        }
        alignas(64) T db[kNP + 1][kLanes];  // a row more: the terms read from s
        // the window's dx in place (those already written, again: dx is not g or x)
        const int64_t w = n - kLanes;
        step<kLanes>(opaque(window ? g + w : gp), opaque(window ? x + w : xp), opaque(window ? dx + w : dxp), 0, op,
                     db);
        if (!window) std::memcpy(dx, dxp, n * sizeof(scalar_t));
        if constexpr (kSums<Op>) {
          VI lane_index;
          for (int l = 0; l < kW; ++l) lane_index[l] = l;
          const char* terms = reinterpret_cast<const char*>(&db[0][0]);
          for_each_param<NP>([&](auto j) {
            for_each_param<kParts>([&](auto q) {
              V d;
              __builtin_memcpy(&d, terms + (j * kLanes + s + q * kW) * sizeof(T), sizeof(V));
              vacc[j][q] += lane_index + static_cast<int_t>(q * kW) < static_cast<int_t>(r) ? d : V{};
            });
          });
        }
      }
    } else {
      // The tail: its element m goes to lane m, as in the main loop. Where a parameter has
      // several vectors (16-bit data's 32 lanes, AVX2), whole vectors of the tail first,
      // each into its vector (scalar terms into the lanes in memory left a 7x7 map's
      // bfloat16 run 17 of its 49 elements one at a time).
      int64_t i = nv;
      if constexpr (kSums<Op> && kVecAcc && kParts > 1) {
        for_each_param<kParts - 1>([&](auto q) {
          if (i + kW > n) return;
          alignas(64) T db[kNP][kW];
          step<kW>(g, x, dx, i, op, db);
          for_each_param<NP>([&](auto j) {
            V d;
            __builtin_memcpy(&d, db[j], sizeof(V));
            vacc[j][q] += d;
          });
          i += kW;
        });
      }
      // The rest, fewer than kW elements: each term into its vector's lane (i - nv) % kW, +0
      // into the others, by compare and select: no trip through memory (a vector load
      // after scalar stores waits for them).
      const int part = static_cast<int>((i - nv) / kW);  // the rest's vector
      VI lane_index;
      for (int l = 0; l < kW; ++l) lane_index[l] = l;
      for (; i < n; ++i) {
        T dp[NP];
        const T v = op.backward(load(g, i), load(x, i), dp);
        if constexpr (kWrites<Op>) store(dx, i, v);
        if constexpr (kSums<Op> && kVecAcc) {
          const VI in_lane = lane_index == static_cast<int_t>((i - nv) % kW);
          for_each_param<kParts>([&](auto q) {
            if (q == part) for_each_param<NP>([&](auto j) { vacc[j][q] += in_lane ? V{} + dp[j] : V{}; });
          });
        } else if constexpr (kSums<Op>) {
          for_each_param<NP>([&](auto j) { acc[j][i - nv] += dp[j]; });
        }
      }
    }
    if constexpr (kSums<Op> && kVecAcc) {  // the vectors into the caller's lanes
      for_each_param<NP>([&](auto j) {
        for_each_param<kParts>([&](auto q) {
          V s;
          __builtin_memcpy(&s, lanes[j] + q * kW, sizeof(V));
          s += vacc[j][q];
          __builtin_memcpy(lanes[j] + q * kW, &s, sizeof(V));
        });
      });
    }
    if constexpr (kSums<Op> && !kVecAcc) {
      for (int j = 0; j < NP; ++j) add_lanes<T, kLanes>(lanes[j], acc[j]);
    }
  }
};

// Runs of `inner` elements that share a channel (NCHW-like), rows [begin, end) of the
// [N][R][C] runs taken in one call: with short maps (7x7, 14x14) a call per run cost more
// than its math. Row `row` is of channel row % C and sample row / (R C).
template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct RunsForwardLoop {
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, scalar_t* y, int64_t inner, int64_t C, int64_t RC,
                                         ParamView<P, NP> pv, int64_t begin, int64_t end, bool stream) {
    using T = opmath_t<scalar_t>;
    for (int64_t row = begin; row < end; ++row) {
      T v[NP];
      pv.load(row / RC, row % C, v);
      ForwardLoop<OpT<T>, scalar_t>::template run<kVector>(x + row * inner, y + row * inner, inner, OpT<T>::from(v),
                                                           stream);
    }
  }
};

// The same rows backward; sums[(row - begin) * NP + j] gets the run's sum for parameter j
// (null for an op without sums). g's rows of C runs are g_gap elements further apart than
// x's (ChannelGeometry::g_gap).
template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct RunsBackwardLoop {
  using T = opmath_t<scalar_t>;
  static constexpr bool kScheduled = kScheduledBackward<OpT<T>, scalar_t>;
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t inner, int64_t C,
                                         int64_t RC, int64_t g_gap, ParamView<P, NP> pv, int64_t begin, int64_t end,
                                         T* sums) {
    for (int64_t row = begin; row < end; ++row) {
      T v[NP];
      pv.load(row / RC, row % C, v);
      const int64_t off = row * inner;
      ReduceBackwardLoop<OpT<T>, scalar_t>::template run<kVector>(g + off + row / C * g_gap, x + off, dx + off, inner,
                                                                  OpT<T>::from(v),
                                                                  kSums<OpT<T>> ? sums + (row - begin) * NP : sums);
    }
  }
};

// The runs of one channel (NCHW-like, at most kChannelGradElems elements a channel) in
// blocks whose lanes are folded once: a group is a sample's R runs where a parameter is
// per sample, else the channel's N R runs; it is cut into blocks of at most B
// consecutive runs (B inner <= kSegment where inner allows).
// The order of a channel's sums, the same in the runs path (channel_backward) and a
// channel at a time (ChannelGradLoop): each run's terms go into its block's lanes (from
// zero) through ReduceBackwardLoop::run_lanes, the blocks' lanes are added in order,
// then folded (fold_lanes).
struct RunBlocks {
  int64_t G, B, per_group, per_channel;  // runs a group, runs a block, blocks a group, a channel

  RunBlocks(const ChannelGeometry& geo, bool per_sample, int64_t segment) {
    G = per_sample ? geo.R : geo.N * geo.R;
    B = std::max<int64_t>(1, segment / std::max<int64_t>(1, geo.inner));
    per_group = G > 0 ? (G + B - 1) / B : 0;
    per_channel = G > 0 ? per_group * (geo.N * geo.R / G) : 0;
  }
  // runs [first, last) of the channel's N R, block k
  FUSEDACT_ALWAYS_INLINE void runs(int64_t k, int64_t& first, int64_t& last) const {
    const int64_t group = k / per_group, start = group * G + k % per_group * B;
    first = start;
    last = std::min(group * G + G, start + B);
  }
};

// Blocks [begin, end) of the [C][RunBlocks::per_channel] order, each whole: dx over its
// runs and its lanes into partial[(t * NP + j) * kLanes + l] for block t.
template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct BlocksBackwardLoop {
  using T = opmath_t<scalar_t>;
  static constexpr bool kScheduled = kScheduledBackward<OpT<T>, scalar_t>;
  static constexpr int kLanes = lanes_of<scalar_t>;
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx, ChannelGeometry geo,
                                         RunBlocks rb, ParamView<P, NP> pv, int64_t begin, int64_t end, T* partial) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / rb.per_channel;
      T(*lanes)[kLanes] = reinterpret_cast<T(*)[kLanes]>(partial + t * NP * kLanes);
      for (int j = 0; j < NP; ++j)
        for (int l = 0; l < kLanes; ++l) lanes[j][l] = T(0);
      block<kVector>(
          g, x, geo, rb, c, t % rb.per_channel,
          [&](int64_t nr) FUSEDACT_LAMBDA_INLINE {
            T v[NP];
            pv.load(nr / geo.R, c, v);
            return OpT<T>::from(v);
          },
          [&](int64_t, int64_t off) FUSEDACT_LAMBDA_INLINE { return dx + off; }, lanes);
    }
  }

  // Block k of channel c: run nr's (of the channel's N R) dx into out_of(nr, its offset
  // in x) and its terms into lanes, with op_of(nr) its op. ChannelGradLoop's too: one
  // order of the terms for both paths.
  template <int kVector, class OpOf, class OutOf>
  static FUSEDACT_ALWAYS_INLINE void block(const scalar_t* g, const scalar_t* x, const ChannelGeometry& geo,
                                           const RunBlocks& rb, int64_t c, int64_t k, OpOf op_of, OutOf out_of,
                                           T (*lanes)[kLanes]) {
    int64_t first, last;
    rb.runs(k, first, last);
    for (int64_t nr = first; nr < last; ++nr) {
      const int64_t off = (nr * geo.C + c) * geo.inner;
      ReduceBackwardLoop<OpT<T>, scalar_t>::template run_lanes<kVector>(g + off + nr * geo.g_gap, x + off,
                                                                        out_of(nr, off), geo.inner, op_of(nr), lanes);
    }
  }
};

// One row of C consecutive channels (channels_last, (N, L, C)): the parameters change
// with every element. The op is built from NP scalar loads (row_params, op_at) and the
// parameter terms are added with compile-time indices (for_each_param): an array
// indexed by a loop variable inside the simd loop keeps GCC from vectorizing it.
// Measurements: benchmarks/NOTES.md, "CPU channels_last: compile-time indices".
template <typename P, int NP>
struct RowParams {
  const P* ptr[NP];  // the row's sample's values, indexed by channel
};

template <typename P, int NP>
FUSEDACT_ALWAYS_INLINE RowParams<P, NP> row_params(const ParamView<P, NP>& pv, int64_t n) {
  RowParams<P, NP> rp;
  for (int j = 0; j < NP; ++j) rp.ptr[j] = pv.ptr[j] + n * pv.n_stride[j];
  return rp;
}

template <template <typename> class OpT, typename T, typename P, int NP>
FUSEDACT_ALWAYS_INLINE OpT<T> op_at(const RowParams<P, NP>& rp, int64_t c) {
  return [&]<int... J>(std::integer_sequence<int, J...>) {
    return OpT<T>{static_cast<T>(rp.ptr[J][c])...};
  }(std::make_integer_sequence<int, NP>{});
}

// Rows of C < kWhole channels (channels_last with few channels) as one flat run, T =
// lcm(C, kWhole) elements (`per` rows) a piece, with the row's parameters repeated T
// long: every element goes through whole vectors, as NCHW's runs and wider rows do. Row
// by row, such a row went through GCC's scalar epilogue, which rounds unlike the vector
// code (float16 BatchNorm + ACON-C's y at C = 15 differed from NCHW's). A sample's last
// piece, fewer rows, is copied into a zero-padded one.
// Measurements: benchmarks/NOTES.md, "Rows under a vector".
template <typename scalar_t, typename P, int NP>
struct RowTiles {
  static constexpr int64_t kW = kWhole<scalar_t>;
  static constexpr int64_t kMax = kW * (kW - 1);  // the longest T (C = kW - 1)
  int64_t C = 0, T = 0, per = 0;
  const P* from[NP > 0 ? NP : 1] = {};  // the values tiled (a sample's rows share them)
  alignas(64) P tile[NP > 0 ? NP : 1][kMax];

  static bool applies(int64_t C) { return C > 0 && C < kW; }
  // The tiles of rp's values (built again only where they are another sample's).
  FUSEDACT_ALWAYS_INLINE RowParams<P, NP> params(const RowParams<P, NP>& rp, int64_t c) {
    bool same = C == c;
    for (int j = 0; j < NP; ++j) same = same && from[j] == rp.ptr[j];
    if (!same) {
      C = c, T = std::lcm(c, kW), per = T / c;
      for (int j = 0; j < NP; ++j) {
        from[j] = rp.ptr[j];
        for (int64_t k = 0; k < T; ++k) tile[j][k] = rp.ptr[j][k % c];
      }
    }
    RowParams<P, NP> tp;
    for (int j = 0; j < NP; ++j) tp.ptr[j] = tile[j];
    return tp;
  }
};

// rows of C elements from src (rows src_row apart) into dst, then zeros up to T
template <typename scalar_t>
FUSEDACT_ALWAYS_INLINE void copy_rows_padded(scalar_t* dst, const scalar_t* src, int64_t rows, int64_t C,
                                             int64_t src_row, int64_t T) {
  for (int64_t q = 0; q < rows; ++q) std::memcpy(dst + q * C, src + q * src_row, C * sizeof(scalar_t));
  std::fill(dst + rows * C, dst + T, scalar_t(0));
}

// Channels of a channels_last row taken as a chunk whose per-channel values (parameters,
// sums) stay in registers across rows: four vectors of T (64 floats at AVX-512). The
// statistics go by chunks where C is a multiple of it; the passes that write (y, dx)
// only where a row is one chunk: with more, each chunk's walk down the rows (C apart)
// cost more than the parameters' loads it saved (C = 96 to 960 slower by up to 1.7x).
// Measurements: benchmarks/NOTES.md, "channels_last statistics in registers".
template <int kVector, typename T>
constexpr int64_t kChannelChunk = 4 * (kVector > 0 ? kVector : 16) / int64_t(sizeof(T));

template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct ChannelsForwardLoop {
  template <int kVector>
  // Rows [begin, end) of C elements; row r is of sample r / R. Where a row is one chunk
  // (kChannelChunk) a sample's rows go with the parameters in registers; else row by
  // row (64 bfloat16 channels a row took twice NCHW's time so).
  // Measurements: benchmarks/NOTES.md, "channels_last statistics in registers".
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, scalar_t* y, int64_t C, ParamView<P, NP> pv, int64_t R,
                                         int64_t begin, int64_t end) {
    using T = opmath_t<scalar_t>;
    constexpr int64_t W = kChannelChunk<kVector, T>;
    using Tiles = RowTiles<scalar_t, P, NP>;
    Tiles tiles;
    for (int64_t row = begin, next; row < end; row = next) {
      const int64_t n = row / R;
      next = std::min(end, (n + 1) * R);
      const RowParams<P, NP> rp = row_params(pv, n);
      if (Tiles::applies(C)) {  // rows under a vector, in pieces of T (RowTiles)
        const RowParams<P, NP> tp = tiles.params(rp, C);
        for (int64_t r = row; r < next; r += tiles.per) {
          const int64_t m = std::min(tiles.per, next - r) * C;
          const bool pad = m < tiles.T;
          alignas(64) scalar_t xp[Tiles::kMax], yp[Tiles::kMax];
          if (pad) copy_rows_padded(xp, x + r * C, 1, m, m, tiles.T);
          const scalar_t* xs = opaque(pad ? xp : x + r * C);
          scalar_t* ys = opaque(pad ? yp : y + r * C);
          store_all<(kVector > 0)>(ys, tiles.T, false, [&](int64_t k) FUSEDACT_LAMBDA_INLINE {
            return op_at<OpT, T>(tp, k).forward(load(xs, k));
          });
          if (pad) std::memcpy(y + r * C, yp, m * sizeof(scalar_t));
        }
        continue;
      }
      if (C == W) {
        T v[NP][W];
        for (int j = 0; j < NP; ++j)
          for (int64_t k = 0; k < W; ++k) v[j][k] = static_cast<T>(rp.ptr[j][k]);
        for (int64_t r = row; r < next; ++r) {
          const scalar_t* xr = x + r * W;
          auto f = [&](int64_t k) FUSEDACT_LAMBDA_INLINE {
            return [&]<int... J>(std::integer_sequence<int, J...>) {
              return OpT<T>{v[J][k]...};
            }(std::make_integer_sequence<int, NP>{})
                       .forward(load(xr, k));
          };
          compute_block<W, (kVector > 0)>(y + r * W, 0, W, f);
        }
        continue;
      }
      for (int64_t r = row; r < next; ++r) {
        const scalar_t* xr = x + r * C;
        store_all<(kVector > 0)>(y + r * C, C, false, [&](int64_t c) FUSEDACT_LAMBDA_INLINE {
          return op_at<OpT, T>(rp, c).forward(load(xr, c));
        });
      }
    }
  }
};

// acc[j * C + c] += g * dy/dparam_j for the row's channel c.
template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct ChannelsBackwardLoop {
  using T = opmath_t<scalar_t>;
  template <int kVector>
  // `rows` consecutive rows of C elements, all of sample n; g's rows g_row apart.
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t C, int64_t g_row,
                                         ParamView<P, NP> pv, int64_t n, int64_t rows, T* acc) {
    const RowParams<P, NP> rp = row_params(pv, n);
    using Tiles = RowTiles<scalar_t, P, NP>;
    if (Tiles::applies(C)) {  // rows under a vector, in pieces of T (RowTiles)
      Tiles tiles;
      const RowParams<P, NP> tp = tiles.params(rp, C);
      const int64_t TT = tiles.T;
      alignas(64) T s[NP > 0 ? NP : 1][Tiles::kMax] = {};  // sums by place in the piece
      for (int64_t r = 0; r < rows; r += tiles.per) {
        const int64_t nr = std::min(tiles.per, rows - r), m = nr * C;
        const bool pad = m < TT, gather = pad || g_row != C;
        alignas(64) scalar_t gp[Tiles::kMax], xp[Tiles::kMax], dxp[Tiles::kMax];
        if (gather) copy_rows_padded(gp, g + r * g_row, nr, C, g_row, TT);
        if (pad) copy_rows_padded(xp, x + r * C, 1, m, m, TT);
        const scalar_t* gs = opaque(gather ? gp : g + r * g_row);
        const scalar_t* xs = opaque(pad ? xp : x + r * C);
        scalar_t* ds = opaque(pad ? dxp : dx + r * C);
        // the padding's terms add +0 (a sum from +0 is never -0)
        auto element = [&](int64_t k) FUSEDACT_LAMBDA_INLINE {
          T dp[NP];
          const T v = op_at<OpT, T>(tp, k).backward(load(gs, k), load(xs, k), dp);
          if constexpr (kSums<OpT<T>>) for_each_param<NP>([&](auto j) { s[j][k] += k < m ? dp[j] : T(0); });
          return v;
        };
        if constexpr (kWrites<OpT<T>>) {                        // element adds to s: no lane computed twice
          compute_block<0, (kVector > 0)>(ds, 0, TT, element);  // store_all's way for TT < its blocks
          if (pad) std::memcpy(dx + r * C, dxp, m * sizeof(scalar_t));
        } else {
#pragma omp simd
          for (int64_t k = 0; k < TT; ++k) element(k);
        }
      }
      if constexpr (kSums<OpT<T>>)
        for (int j = 0; j < NP; ++j)
          for (int64_t k = 0; k < TT; ++k) acc[j * C + k % C] += s[j][k];
      return;
    }
    // a row that is one chunk (kChannelChunk): parameters and sums in registers; each
    // channel's sums still go row by row from zero, so acc gets the same values
    constexpr int64_t W = kChannelChunk<kVector, T>;
    if (C == W) {
      T v[NP][W];
      for (int j = 0; j < NP; ++j)
        for (int64_t k = 0; k < W; ++k) v[j][k] = static_cast<T>(rp.ptr[j][k]);
      T s[NP][W] = {};
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* gr = g + r * g_row;
        const scalar_t* xr = x + r * W;
        auto element = [&](int64_t k) FUSEDACT_LAMBDA_INLINE {
          T dp[NP];
          const OpT<T> op = [&]<int... J>(std::integer_sequence<int, J...>) {
            return OpT<T>{v[J][k]...};
          }(std::make_integer_sequence<int, NP>{});
          const T val = op.backward(load(gr, k), load(xr, k), dp);
          if constexpr (kSums<OpT<T>>) for_each_param<NP>([&](auto j) { s[j][k] += dp[j]; });
          return val;
        };
        if constexpr (kWrites<OpT<T>>) {
          compute_block<W, (kVector > 0)>(dx + r * W, 0, W, element);
        } else {
#pragma omp simd
          for (int64_t k = 0; k < W; ++k) element(k);
        }
      }
      if constexpr (kSums<OpT<T>>)
        for (int j = 0; j < NP; ++j)
          for (int64_t k = 0; k < W; ++k) acc[j * W + k] += s[j][k];
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* gr = g + r * g_row;
      const scalar_t* xr = x + r * C;
      auto element = [&](int64_t c) FUSEDACT_LAMBDA_INLINE {
        T dp[NP];
        const T v = op_at<OpT, T>(rp, c).backward(load(gr, c), load(xr, c), dp);
        if constexpr (kSums<OpT<T>>) for_each_param<NP>([&](auto j) { acc[j * C + c] += dp[j]; });
        return v;
      };
      if constexpr (kWrites<OpT<T>>) {  // element adds to acc: no lane computed twice
        store_all<(kVector > 0), scalar_t, decltype(element), false>(dx + r * C, C, false, element);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) element(c);
      }
    }
  }
};

// batch_norm_act's backward for channels [b, e), each whole (CpuBackend::channel_grad):
// OpT's sums over the channel's N R runs of `inner` elements in RunBlocks' order (that of
// channel_backward's runs path), dz into the scratch `dz`, then dx's coefficients and
// dx = BnDx(dz, x). One call a task: with short maps a call per run cost more than its math.
template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct ChannelGradLoop {
  using T = opmath_t<scalar_t>;
  static constexpr bool kScheduled = kScheduledBackward<OpT<T>, scalar_t>;
  static constexpr int kLanes = lanes_of<scalar_t>;
  template <int kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx, ChannelGeometry geo,
                                         RunBlocks rb, ParamView<P, NP> pv, const P* invstd, bool training, int64_t b,
                                         int64_t e, scalar_t* dz, P* sums) {
    const int64_t C = geo.C, inner = geo.inner, NR = geo.N * geo.R;
    const T M = static_cast<T>(NR * inner);
    for (int64_t c = b; c < e; ++c) {
      T v[NP];
      pv.load(0, c, v);
      const OpT<T> op = OpT<T>::from(v);
      T lanes[NP][kLanes] = {};
      for (int64_t k = 0; k < rb.per_channel; ++k) {
        T block[NP][kLanes] = {};
        BlocksBackwardLoop<OpT, scalar_t, P, NP>::template block<kVector>(
            g, x, geo, rb, c, k, [&](int64_t) FUSEDACT_LAMBDA_INLINE { return op; },
            [&](int64_t nr, int64_t) FUSEDACT_LAMBDA_INLINE { return dz + nr * inner; }, block);
        for (int j = 0; j < NP; ++j) add_lanes<T, kLanes>(lanes[j], block[j]);
      }
      T total[NP];
      for (int j = 0; j < NP; ++j) total[j] = fold_lanes<T, kLanes>(lanes[j]);
      T k2, cc;
      math::bn_dx_coefficients<T>(v[1], invstd[c], total[0], total[1], M, training, k2, cc);
      const math::BnDx<T> dx_op{v[1], k2, v[0], cc};
      for (int64_t nr = 0; nr < NR; ++nr) {
        const int64_t off = (nr * C + c) * inner;
        ReduceBackwardLoop<math::BnDx<T>, scalar_t>::template run<kVector>(dz + nr * inner, x + off, dx + off, inner,
                                                                           dx_op, static_cast<T*>(nullptr));
      }
      for (int j = 0; j < NP; ++j) sums[j * C + c] = total[j];
    }
  }
};

// Which loops run_chunk compiles with the first scheduler (kScheduledBackward): the
// BatchNorm + SiLU/Swish/hard-Swish backward over runs of bfloat16, nothing else.
using Bf16 = c10::BFloat16;
static_assert(Scheduled<RunsBackwardLoop<math::BnActSums<math::Silu>::template Op, Bf16, float, 3>>::value);
static_assert(Scheduled<RunsBackwardLoop<math::BnActDx<math::HardSwish>::template Op, Bf16, float, 5>>::value);
static_assert(Scheduled<ChannelGradLoop<math::BnAct<math::Swish>::template Op, Bf16, float, 4>>::value);
static_assert(Scheduled<ReduceBackwardLoop<math::BnAct<math::Silu>::Op<float>, Bf16>>::value);
static_assert(!Scheduled<RunsBackwardLoop<math::BnActSums<math::Silu>::template Op, float, float, 3>>::value);
static_assert(!Scheduled<RunsBackwardLoop<math::BnActSums<math::Silu>::template Op, c10::Half, float, 3>>::value);
static_assert(!Scheduled<RunsBackwardLoop<math::BnActSums<math::Mish>::template Op, Bf16, float, 3>>::value);
static_assert(!Scheduled<ReduceBackwardLoop<math::BnDx<float>, Bf16>>::value);
static_assert(!Scheduled<BackwardLoop<math::Silu<float>, Bf16>>::value);
static_assert(!Scheduled<ChannelsBackwardLoop<math::BnActSums<math::Silu>::template Op, Bf16, float, 3>>::value);
#ifdef FUSEDACT_X86_PATHS
// Which elementwise loops take bfloat16 through `unpacked` (kUnpacks): AVX2, not Mish's
// nor ACON-C's.
static_assert(kUnpacks<32, Bf16, math::BnAct<math::HardSwish>::Op<float>>);
static_assert(kUnpacks<32, Bf16, math::BnDx<float>> && kUnpacks<32, Bf16, math::Silu<float>>);
static_assert(!kUnpacks<32, Bf16, math::BnAct<math::Mish>::Op<float>> && !kUnpacks<32, Bf16, math::Mish<float>>);
static_assert(!kUnpacks<32, Bf16, math::AconC<float>> && !kUnpacks<64, Bf16, math::Silu<float>>);
static_assert(!kUnpacks<32, float, math::Silu<float>> && !kUnpacks<32, c10::Half, math::Silu<float>>);
#endif

}  // namespace
}  // namespace fusedact
