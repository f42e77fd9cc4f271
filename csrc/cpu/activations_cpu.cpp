// CPU backend: loops over activation_math.h, parallel with at::parallel_for. Each
// chunk loop is compiled three times, for AVX-512, for AVX2+FMA and for baseline x86-64,
// and the best the CPU can run is picked at run time (as ATen picks its kernels); the
// compiler vectorizes each (the math header has no libm calls for float), `#pragma omp
// simd` telling it that it may.
//
// Parameter gradients are deterministic: every task writes its opmath partial sums to
// its own slot of a [N][K][C][NP] buffer (runs of one channel: a block's lanes, RunBlocks
// in loops.h), and a fixed-order pass adds them up, so the result does not depend on the
// thread count or scheduling.
//
// One translation unit, the rest in headers: the loops must inline into run_chunk's target copies.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../ops_impl.h"
#include "bn_stats.h"
#include "isa.h"
#include "loops.h"
#include "stores.h"

namespace fusedact {
namespace {

// ---- the backend

constexpr int64_t kGrain = 32768;    // elements per parallel task, at least
constexpr int64_t kSegment = 16384;  // elements per partial sum along a channel run

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct CpuBackend {
  static constexpr bool kGradRowStride = true;  // reads g's rows geo.g_gap further apart than x's
  template <class Op, typename scalar_t>
  static void forward(const scalar_t* x, scalar_t* y, int64_t n, Op op) {
    const bool stream = stream_forward_output(y, n);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      run_chunk<ForwardLoop<Op, scalar_t>>(x + b, y + b, e - b, op, stream);
    });
  }

  template <class Op, typename scalar_t>
  static void backward(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t n, Op op) {
    const bool stream =
        stream_output(dx, n, kStreamBackward<Op> && 3 * n * int64_t(sizeof(scalar_t)) >= kStreamBackwardBytes);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      run_chunk<BackwardLoop<Op, scalar_t>>(g + b, x + b, dx + b, e - b, op, stream);
    });
  }

  // Runs of `inner` elements share a channel (inner > 1): tasks are (row, segment)
  // pieces of at most kSegment elements with the parameters fixed.
  template <typename F>
  static void for_each_segment(const ChannelGeometry& geo, F f) {
    const int64_t segs = ceil_div(geo.inner, kSegment);
    const int64_t tasks = geo.N * geo.R * geo.C * segs;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::min(geo.inner, kSegment));
    at::parallel_for(0, tasks, grain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t s = t % segs, row = t / segs;
        const int64_t c = row % geo.C, nr = row / geo.C;
        const int64_t begin = s * kSegment;
        f(nr / geo.R, nr % geo.R, c, s, segs, row * geo.inner + begin, std::min(kSegment, geo.inner - begin));
      }
    });
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static void channel_forward(const scalar_t* x, scalar_t* y, const ChannelGeometry& geo, ParamView<P, NP> pv) {
    using T = opmath_t<scalar_t>;
    if (geo.inner > 1 && geo.inner <= kSegment) {
      const bool stream = stream_forward_output(y, geo.N * geo.R * geo.C * geo.inner);
      const int64_t runs = geo.N * geo.R * geo.C;
      at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / geo.inner), [&](int64_t b, int64_t e) {
        run_chunk<RunsForwardLoop<OpT, scalar_t, P, NP>>(x, y, geo.inner, geo.C, geo.R * geo.C, pv, b, e, stream);
      });
      return;
    }
    if (geo.inner > 1) {
      const bool stream = stream_forward_output(y, geo.N * geo.R * geo.C * geo.inner);
      for_each_segment(geo, [&](int64_t n, int64_t, int64_t c, int64_t, int64_t, int64_t off, int64_t len) {
        T v[NP];
        pv.load(n, c, v);
        run_chunk<ForwardLoop<OpT<T>, scalar_t>>(x + off, y + off, len, OpT<T>::from(v), stream);
      });
      return;
    }
    const int64_t rows = geo.N * geo.R, C = geo.C;
    // One call per task, not per row: a row of 64 channels is 4 AVX-512 vectors, less
    // work than the call.
    // Measurements: benchmarks/NOTES.md, "CPU channels_last: one call a task".
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
      run_chunk<ChannelsForwardLoop<OpT, scalar_t, P, NP>>(x, y, C, pv, geo.R, b, e);
    });
  }

  // dx of an op without sums (kNoSums) over the geometry, split as channel_forward is.
  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static void channel_map(const scalar_t* g, const scalar_t* x, scalar_t* dx, const ChannelGeometry& geo,
                          ParamView<P, NP> pv) {
    using T = opmath_t<scalar_t>;
    if (geo.inner > 1 && geo.inner <= kSegment) {
      at::parallel_for(0, geo.N * geo.R * geo.C, std::max<int64_t>(1, kGrain / geo.inner), [&](int64_t b, int64_t e) {
        run_chunk<RunsBackwardLoop<OpT, scalar_t, P, NP>>(g, x, dx, geo.inner, geo.C, geo.R * geo.C, geo.g_gap, pv, b,
                                                          e, static_cast<T*>(nullptr));
      });
    } else if (geo.inner > 1) {
      for_each_segment(geo, [&](int64_t n, int64_t r, int64_t c, int64_t, int64_t, int64_t off, int64_t len) {
        T v[NP];
        pv.load(n, c, v);
        run_chunk<ReduceBackwardLoop<OpT<T>, scalar_t>>(g + off + (n * geo.R + r) * geo.g_gap, x + off, dx + off, len,
                                                        OpT<T>::from(v), static_cast<T*>(nullptr));
      });
    } else {
      const int64_t C = geo.C;
      at::parallel_for(0, geo.N * geo.R, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
        for (int64_t row = b, next; row < e; row = next) {  // one call per sample's rows
          const int64_t n = row / geo.R;
          next = std::min(e, (n + 1) * geo.R);
          run_chunk<ChannelsBackwardLoop<OpT, scalar_t, P, NP>>(g + row * (C + geo.g_gap), x + row * C, dx + row * C, C,
                                                                C + geo.g_gap, pv, n, next - row,
                                                                static_cast<T*>(nullptr));
        }
      });
    }
  }

  // The parameters' gradient sums in opmath: (C,), or (N C,) for a per-sample one.
  template <typename T, typename P, int NP>
  static std::array<at::Tensor, NP> sums_out(const ParamView<P, NP>& pv, int64_t N, int64_t C,
                                             const at::TensorOptions& options, T* (&outp)[NP]) {
    std::array<at::Tensor, NP> out;
    const auto acc_options = options.dtype(c10::CppTypeToScalarType<T>::value).device(at::kCPU);
    for (int j = 0; j < NP; ++j) {
      out[j] = at::empty({pv.n_stride[j] ? N * C : C}, acc_options);
      outp[j] = out[j].template data_ptr<T>();
    }
    return out;
  }

  template <typename P, int NP>
  static bool any_per_sample(const ParamView<P, NP>& pv) {
    for (int j = 0; j < NP; ++j)
      if (pv.n_stride[j]) return true;
    return false;
  }

  // channel_backward where a channel's runs are at most kSegment long: tasks are blocks
  // of a channel's runs (RunBlocks), each writing its lanes; per channel the blocks'
  // lanes are added in order and folded, for a per-sample parameter those of each sample.
  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static std::array<at::Tensor, NP> runs_backward(const scalar_t* g, const scalar_t* x, scalar_t* dx,
                                                  const ChannelGeometry& geo, ParamView<P, NP> pv,
                                                  const at::TensorOptions& options) {
    using T = opmath_t<scalar_t>;
    constexpr int kLanes = lanes_of<scalar_t>;
    const int64_t N = geo.N, C = geo.C;
    const RunBlocks rb(geo, any_per_sample(pv), kSegment);
    std::vector<T> partial(C * rb.per_channel * NP * kLanes);
    at::parallel_for(0, C * rb.per_channel, std::max<int64_t>(1, kGrain / (rb.B * geo.inner)),
                     [&](int64_t b, int64_t e) {
                       run_chunk<BlocksBackwardLoop<OpT, scalar_t, P, NP>>(g, x, dx, geo, rb, pv, b, e, partial.data());
                     });
    T* outp[NP];
    std::array<at::Tensor, NP> out = sums_out<T>(pv, N, C, options, outp);
    at::parallel_for(0, C, std::max<int64_t>(1, kGrain / (rb.per_channel * NP * kLanes)), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        for (int j = 0; j < NP; ++j) {
          const bool per_sample = pv.n_stride[j] != 0;
          T lanes[kLanes] = {};
          for (int64_t k = 0; k < rb.per_channel; ++k) {
            const T* block = &partial[((c * rb.per_channel + k) * NP + j) * kLanes];
            add_lanes<T, kLanes>(lanes, block);
            if (per_sample && (k + 1) % rb.per_group == 0) {  // a group is a sample here
              outp[j][k / rb.per_group * C + c] = fold_lanes<T, kLanes>(lanes);
              for (int l = 0; l < kLanes; ++l) lanes[l] = T(0);
            }
          }
          if (!per_sample) outp[j][c] = fold_lanes<T, kLanes>(lanes);
        }
    });
    return out;
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static std::array<at::Tensor, NP> channel_backward(const scalar_t* g, const scalar_t* x, scalar_t* dx,
                                                     const ChannelGeometry& geo, ParamView<P, NP> pv,
                                                     const at::TensorOptions& options) {
    using T = opmath_t<scalar_t>;
    const int64_t N = geo.N, C = geo.C;
    const bool empty = geo.R * geo.inner == 0;
    if constexpr (!math::kSums<OpT<T>>) {  // dx alone: no partial sums, no finish
      if (!empty) channel_map<OpT>(g, x, dx, geo, pv);
      return {};
    }
    // short runs of a small channel: blocks of runs, channel_grad's order; a larger
    // channel's runs go in memory order (channel-major blocks measured 0.79-0.95x at
    // (32, 64, 56, 56)), each run folded (a small share of a long run's work)
    if (short_runs(geo) && geo.inner <= kSegment) return runs_backward<OpT>(g, x, dx, geo, pv, options);
    // partial[((n * K + k) * C + c) * NP + j]: slot k of (sample n, channel c).
    int64_t K = 0;
    std::vector<T> partial;
    if (empty) {
      K = 0;
    } else if (geo.inner > 1 && geo.inner <= kSegment) {
      // One slot per run: slot r of (n, c) is run (n R + r) C + c, at partial[run * NP].
      K = geo.R;
      partial.resize(N * K * C * NP);
      at::parallel_for(0, N * K * C, std::max<int64_t>(1, kGrain / geo.inner), [&](int64_t b, int64_t e) {
        run_chunk<RunsBackwardLoop<OpT, scalar_t, P, NP>>(g, x, dx, geo.inner, C, geo.R * C, geo.g_gap, pv, b, e,
                                                          &partial[b * NP]);
      });
    } else if (geo.inner > 1) {
      const int64_t segs = ceil_div(geo.inner, kSegment);
      K = geo.R * segs;
      partial.resize(N * K * C * NP);
      for_each_segment(geo, [&](int64_t n, int64_t r, int64_t c, int64_t s, int64_t segs_, int64_t off, int64_t len) {
        T v[NP], sums[NP];
        pv.load(n, c, v);
        run_chunk<ReduceBackwardLoop<OpT<T>, scalar_t>>(g + off + (n * geo.R + r) * geo.g_gap, x + off, dx + off, len,
                                                        OpT<T>::from(v), sums);
        T* slot = &partial[((n * K + r * segs_ + s) * C + c) * NP];
        for (int j = 0; j < NP; ++j) slot[j] = sums[j];
      });
    } else {
      // Rows of C channels; a task sums a block of rows of one sample per channel.
      const int64_t rows_per_block = std::max<int64_t>(1, kSegment / C);
      K = ceil_div(geo.R, rows_per_block);
      partial.resize(N * K * C * NP);
      at::parallel_for(0, N * K, 1, [&](int64_t b, int64_t e) {
        std::vector<T> acc(NP * C);
        for (int64_t t = b; t < e; ++t) {
          const int64_t n = t / K, k = t % K;
          std::fill(acc.begin(), acc.end(), T(0));
          const int64_t r_begin = k * rows_per_block;
          const int64_t r_end = std::min(geo.R, r_begin + rows_per_block);
          const int64_t off = (n * geo.R + r_begin) * C;
          run_chunk<ChannelsBackwardLoop<OpT, scalar_t, P, NP>>(g + (n * geo.R + r_begin) * (C + geo.g_gap), x + off,
                                                                dx + off, C, C + geo.g_gap, pv, n, r_end - r_begin,
                                                                acc.data());
          for (int64_t c = 0; c < C; ++c)
            for (int j = 0; j < NP; ++j) partial[(t * C + c) * NP + j] = acc[j * C + c];
        }
      });
    }
    // Fixed-order finish: per channel, samples then slots.
    T* outp[NP];
    std::array<at::Tensor, NP> out = sums_out<T>(pv, N, C, options, outp);
    at::parallel_for(0, C, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, N * K * NP)), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        for (int j = 0; j < NP; ++j) {
          T total = 0;
          for (int64_t n = 0; n < N; ++n) {
            T s = 0;
            for (int64_t k = 0; k < K; ++k) s += partial[((n * K + k) * C + c) * NP + j];
            if (pv.n_stride[j]) outp[j][n * C + c] = s;
            total += s;
          }
          if (!pv.n_stride[j]) outp[j][c] = total;
        }
    });
    return out;
  }

  // batch_norm_act's backward a channel at a time, where a channel's runs are short
  // (NCHW-like, at most kChannelGradElems elements a channel) and every parameter is per
  // channel: a task takes whole channels, sums OpT's slots over the channel's runs
  // writing dz to a scratch buffer that stays in cache, forms dx's coefficients, then
  // dx = BnDx(dz, x). The same loops, sums in the same order and the same coefficient
  // arithmetic as the two passes of bn_act_grad (bitwise the same), one parallel region
  // and no second trip of g and x through memory. sums: [NP][C], in opmath. False where
  // it does not apply.
  // Measurements: benchmarks/NOTES.md, "BatchNorm + activation", fourth pass.
  static constexpr int64_t kChannelGradElems = 32768;

  // Whether a channel's runs go in blocks (RunBlocks): runs of one channel (inner > 1),
  // at most kChannelGradElems elements a channel, none empty. bn_stats (channel_sums) and
  // the channel-at-a-time forward agree bitwise only because both ask this.
  static bool short_runs(const ChannelGeometry& geo) {
    const int64_t per_channel = geo.N * geo.R * geo.inner;
    return geo.inner > 1 && per_channel > 0 && per_channel <= kChannelGradElems;
  }

  // Whether a channel at a time applies (channel_grad, channel_train_forward): short runs
  // and every parameter per channel.
  template <typename P, int NP>
  static bool short_channels(const ChannelGeometry& geo, const ParamView<P, NP>& pv) {
    return short_runs(geo) && !any_per_sample(pv);
  }

  // Whether channel_grad applies (asked before its outputs are allocated): short
  // channels whose runs channel_backward sums whole (longer ones go in segments there:
  // another order).
  template <typename P, int NP>
  static bool grads_by_channel(const ChannelGeometry& geo, const ParamView<P, NP>& pv) {
    return short_channels(geo, pv) && geo.inner <= kSegment;
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static void channel_grad(const scalar_t* g, const scalar_t* x, scalar_t* dx, const ChannelGeometry& geo,
                           ParamView<P, NP> pv, const P* invstd, bool training, P* sums) {
    using T = opmath_t<scalar_t>;
    static_assert(std::is_same_v<T, P>, "batch_norm_act's parameters are opmath-typed");
    TORCH_INTERNAL_ASSERT(grads_by_channel(geo, pv));
    const int64_t per_channel = geo.N * geo.R * geo.inner;
    const int64_t grain = std::max<int64_t>(1, kGrain / per_channel);
    const RunBlocks rb(geo, false, kSegment);  // channel_backward's runs path's order
    at::parallel_for(0, geo.C, grain, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> dz(per_channel);
      run_chunk<ChannelGradLoop<OpT, scalar_t, P, NP>>(g, x, dx, geo, rb, pv, invstd, training, b, e, dz.data(), sums);
    });
  }

  // batch_norm_act's training forward a channel at a time where its backward goes so
  // (channel_grad's geometry): per channel the statistics' two passes, then y, the
  // channel's x read from memory once and twice from cache; bitwise bn_stats then
  // channel_forward. Where trains_by_channel (asked before y is allocated).
  template <typename P, int NP>
  static bool trains_by_channel(const ChannelGeometry& geo, const ParamView<P, NP>& pv) {
    return short_channels(geo, pv);
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static void channel_train_forward(const scalar_t* x, scalar_t* y, const ChannelGeometry& geo, ParamView<P, NP> pv,
                                    BnTrainChannels<P> out) {
    TORCH_INTERNAL_ASSERT(trains_by_channel(geo, pv));
    const int64_t per_channel = geo.N * geo.R * geo.inner;
    const bool stream = stream_forward_output(y, per_channel * geo.C);
    const RunBlocks rb(geo, false, kStatsSegment);  // channel_sums' order
    at::parallel_for(0, geo.C, std::max<int64_t>(1, kGrain / per_channel), [&](int64_t b, int64_t e) {
      run_chunk<ChannelTrainForwardLoop<OpT, scalar_t, P, NP>>(x, y, geo, rb, pv, out, b, e, stream);
    });
  }

  // batch_norm_act's statistics: (sums of x - shift, sums of its squares) per channel,
  // in double, over the [N][R][C][inner] geometry. Blocks are fixed and their sums added
  // in order: a short channel's runs (NCHW-like, at most kChannelGradElems elements a
  // channel) in blocks of RunBlocks (channel_train_forward's order), a longer channel's
  // a run each in memory order, or kRowBlock rows of C channels (channels_last). shift
  // null: the mean's pass, s1 the sums of x alone (bitwise those about a shift of 0), s2 0.
  template <typename scalar_t>
  static void channel_sums(const scalar_t* x, const ChannelGeometry& geo, const opmath_t<scalar_t>* shift, double* s1,
                           double* s2) {
    if (shift)
      channel_sums<scalar_t, true>(x, geo, shift, s1, s2);
    else
      channel_sums<scalar_t, false>(x, geo, shift, s1, s2);
  }

  template <typename scalar_t, bool kSquares>
  static void channel_sums(const scalar_t* x, const ChannelGeometry& geo, const opmath_t<scalar_t>* shift, double* s1,
                           double* s2) {
    using T = opmath_t<scalar_t>;
    const int64_t C = geo.C, R = geo.N * geo.R;
    constexpr int64_t kRowBlock = 64;
    // partial[(k * k_stride + c * c_stride) * 2 + {0, 1}]: block k's sums of channel c
    int64_t blocks, k_stride = C, c_stride = 1;
    std::vector<double> partial;
    if (short_runs(geo)) {
      const RunBlocks rb(geo, false, kStatsSegment);
      blocks = rb.per_channel;
      k_stride = 1, c_stride = blocks;  // a channel's blocks side by side
      partial.assign(blocks * C * 2, 0.0);
      at::parallel_for(0, C * blocks, std::max<int64_t>(1, kGrain / (rb.B * geo.inner)), [&](int64_t b, int64_t e) {
        run_chunk<BlocksSumsLoop<scalar_t, kSquares>>(x, geo, rb, shift, b, e, partial.data());
      });
    } else if (geo.inner > 1) {  // runs: block r holds run (r, c) of `inner` elements for every c
      blocks = R;
      partial.assign(blocks * C * 2, 0.0);
      at::parallel_for(0, R * C, std::max<int64_t>(1, kGrain / geo.inner), [&](int64_t b, int64_t e) {
        run_chunk<RunsSumsLoop<scalar_t, kSquares>>(x, geo.inner, C, shift, b, e, partial.data());
      });
    } else {  // rows of C channels, kRowBlock rows a block
      blocks = ceil_div(R, kRowBlock);
      partial.assign(blocks * C * 2, 0.0);
      at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / (kRowBlock * C)), [&](int64_t b, int64_t e) {
        std::vector<T> a(C), q(C);
        for (int64_t k = b; k < e; ++k)
          run_chunk<RowSumsLoop<scalar_t, kSquares>>(x + k * kRowBlock * C, std::min(kRowBlock, R - k * kRowBlock), C,
                                                     shift, a.data(), q.data(), &partial[k * C * 2]);
      });
    }
    // per channel, the blocks' sums in block order; the loops in memory order (rows and
    // runs lay partial out block-major: a channel-major walk took a line a term)
    std::fill(s1, s1 + C, 0.0);
    std::fill(s2, s2 + C, 0.0);
    auto add = [&](int64_t k, int64_t c) {
      const double* p = &partial[(k * k_stride + c * c_stride) * 2];
      s1[c] += p[0], s2[c] += p[1];
    };
    if (c_stride == 1) {
      for (int64_t k = 0; k < blocks; ++k)
        for (int64_t c = 0; c < C; ++c) add(k, c);
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < blocks; ++k) add(k, c);
    }
  }
};

}  // namespace
}  // namespace fusedact

FUSEDACT_REGISTER_BACKEND(CPU, fusedact::CpuBackend)
FUSEDACT_REGISTER_BN_ACT(CPU, fusedact::CpuBackend)
