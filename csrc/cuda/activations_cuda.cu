// CUDA backend: launchers over activation_math.h. Flat ops stream 16-byte packs
// (8 halves or 4 floats) when every pointer is 16-byte aligned, with a scalar tail,
// else scalar loads; 32-bit indexing when the tensor is small enough, 64-bit
// otherwise. Everything runs on the current stream under the device guard that
// ops_impl.h takes, and every launch is checked.
//
// Parameter gradients are deterministic: each block reduces its share with a fixed
// shuffle tree into its own slot of a [N][K][C][NP] fp32 (fp64 for double) partial
// buffer, and one block per output sums the slots in a fixed order. No atomics.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../ops_impl.h"
#include "partition.h"

namespace fusedact {
namespace {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

using part::kThreads;

template <typename scalar_t>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// The channels kernel's pack: 16 bytes, but 8 for float16, whose 8-channel backward
// (8 x 3 parameters and 8 x 3 sums in registers) ptxas compiled with a spill (the SASS
// check), while bfloat16's did not.
template <typename scalar_t>
constexpr int channels_vec_size() {
  return std::is_same_v<scalar_t, c10::Half> ? 4 : vec_size<scalar_t>();
}

// How exp and division are computed (activation_math.h): the GPU's one-instruction
// approximations where the result is rounded to 16 bits: every float16/bfloat16
// forward, and bfloat16's dx where no parameter gradient is summed. float16's dx stays
// Precise: near the zero of swish's and mish's slope (x = -1.28, -1.19) the slope's two
// terms cancel and an error of 2 float32 ulp in exp already moves float16's result by 3
// ulp (tests/test_lowp.py). float32/float64: Precise.
template <typename scalar_t, bool kBackward = false>
using MathFor = std::conditional_t<sizeof(scalar_t) == 2 && !(kBackward && std::is_same_v<scalar_t, c10::Half>),
                                   math::Lowp, math::Precise>;
// The backward that sums parameter gradients (acon_c, swish with a tensor beta): the
// reciprocal alone approximated for 16-bit data (LowpRcp), 1 float32 ulp more in each
// summed term, inside the 8 ulp a term its tolerance allows (tests/test_lowp.py).
template <typename scalar_t>
using SumsMathFor = std::conditional_t<sizeof(scalar_t) == 2, math::LowpRcp, math::Precise>;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// The int64 grid-stride launch (tensors over 2^31 elements) needs no more blocks than
// fill the GPU: 8 resident blocks of kThreads per SM. The SM count is asked once per
// device (a benign race: every writer stores the same value).
int max_blocks() {
  static std::atomic<int> sm_count[C10_COMPILE_TIME_MAX_GPUS] = {};
  const int dev = c10::cuda::current_device();
  int sms = sm_count[dev].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    sm_count[dev].store(sms, std::memory_order_relaxed);
  }
  return sms * 8;
}

// ---- flat elementwise: y = op.forward(x), or dx = op.backward(g, x). The partition
// (partition.h's Flat): kFlatPacks packs per thread, all loaded before any is computed;
// one tile per block with int32 indices, a grid-stride loop over tiles with int64.

template <class Op, typename scalar_t, int VEC, typename index_t, bool kBackward>
__device__ __forceinline__ void flat_tile(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                          scalar_t* __restrict__ out, const part::Flat<index_t>& f, index_t tile,
                                          Op op) {
  using T = opmath_t<scalar_t>;
  using V = Pack<scalar_t, VEC>;
  using M = MathFor<scalar_t, kBackward>;
  constexpr int P = part::kFlatPacks;
  const int t = threadIdx.x;
  index_t at[P];
  V xv[P], gv[P];
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const index_t p = f.pack(tile, k, t, kThreads);
    at[k] = p < 0 ? index_t(-1) : f.pack_start(p);
    if (p >= 0) {
      xv[k] = *reinterpret_cast<const V*>(x + at[k]);
      if constexpr (kBackward) gv[k] = *reinterpret_cast<const V*>(g + at[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < P; ++k) {
    if (at[k] < 0) continue;
    V ov;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if constexpr (kBackward)
        ov.v[v] =
            static_cast<scalar_t>(op.template backward<M>(static_cast<T>(gv[k].v[v]), static_cast<T>(xv[k].v[v])));
      else
        ov.v[v] = static_cast<scalar_t>(op.template forward<M>(static_cast<T>(xv[k].v[v])));
    }
    *reinterpret_cast<V*>(out + at[k]) = ov;
  }
  const index_t e = f.extra(tile, t);
  if (e >= 0) {
    if constexpr (kBackward)
      out[e] = static_cast<scalar_t>(op.template backward<M>(static_cast<T>(g[e]), static_cast<T>(x[e])));
    else
      out[e] = static_cast<scalar_t>(op.template forward<M>(static_cast<T>(x[e])));
  }
}

template <class Op, typename scalar_t, int VEC, typename index_t, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                       part::Flat<index_t> f, Op op) {
  if constexpr (std::is_same_v<index_t, int32_t>) {
    flat_tile<Op, scalar_t, VEC, index_t, kBackward>(g, x, out, f, index_t(blockIdx.x), op);
  } else {
    const index_t tiles = f.tiles(kThreads);
    for (index_t tile = blockIdx.x; tile < tiles; tile += gridDim.x)
      flat_tile<Op, scalar_t, VEC, index_t, kBackward>(g, x, out, f, tile, op);
  }
}

template <typename scalar_t>
__host__ __device__ inline int head16(const scalar_t* p) {
  return part::head_to_align16(reinterpret_cast<uintptr_t>(p), sizeof(scalar_t));
}

template <bool kBackward, class Op, typename scalar_t>
void launch_elementwise(const scalar_t* g, const scalar_t* x, scalar_t* out, int64_t n, Op op) {
  constexpr int V = vec_size<scalar_t>();
  // Packs when x, out (and g) are equally far from a 16-byte boundary: a view that
  // starts at element 1 runs its first V - 1 elements as scalars, the rest in packs.
  const int head = head16(x);
  const bool vec = head16(out) == head && (!kBackward || head16(g) == head);
  const part::FlatLaunch l = part::flat_launch(n, head, vec ? V : 1, max_blocks());
  const unsigned blocks = static_cast<unsigned>(l.blocks);
  auto stream = c10::cuda::getCurrentCUDAStream();
  using part::Flat;
  if (vec && l.int32)
    elementwise_kernel<Op, scalar_t, V, int32_t, kBackward><<<blocks, kThreads, 0, stream>>>(
        g, x, out, Flat<int32_t>::make(static_cast<int32_t>(n), head, V, part::kFlatPacks), op);
  else if (vec)
    elementwise_kernel<Op, scalar_t, V, int64_t, kBackward>
        <<<blocks, kThreads, 0, stream>>>(g, x, out, Flat<int64_t>::make(n, head, V, part::kFlatPacks), op);
  else if (l.int32)
    elementwise_kernel<Op, scalar_t, 1, int32_t, kBackward><<<blocks, kThreads, 0, stream>>>(
        g, x, out, Flat<int32_t>::make(static_cast<int32_t>(n), 0, 1, part::kFlatPacks), op);
  else
    elementwise_kernel<Op, scalar_t, 1, int64_t, kBackward>
        <<<blocks, kThreads, 0, stream>>>(g, x, out, Flat<int64_t>::make(n, 0, 1, part::kFlatPacks), op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- deterministic block sum (blockDim.x * blockDim.y a multiple of 32, <= 1024)

template <typename T, int NP>
__device__ void block_sum(T (&v)[NP]) {
  __shared__ T smem[NP][32];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int lane = tid % 32, warp = tid / 32;
  const int warps = (blockDim.x * blockDim.y) / 32;
#pragma unroll
  for (int j = 0; j < NP; ++j)
    for (int o = 16; o > 0; o /= 2) v[j] += __shfl_down_sync(0xffffffffu, v[j], o);
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < NP; ++j) smem[j][warp] = v[j];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      v[j] = lane < warps ? smem[j][lane] : T(0);
      for (int o = 16; o > 0; o /= 2) v[j] += __shfl_down_sync(0xffffffffu, v[j], o);
    }
  }
}

// ---- the row kernel's group sum: each warp reduces its lanes by a shuffle tree; a
// group of one warp is done (lane 0 holds it), a larger one's thread 0 adds its warps'
// sums in order (partition.h's row_group_warp0). Every thread of the block calls it.
template <typename T, int NP>
__device__ void group_sum(T (&v)[NP], const part::RowLaunch& l, int tid) {
  __shared__ T smem[NP][kThreads / 32];
#pragma unroll
  for (int j = 0; j < NP; ++j)
    for (int o = 16; o > 0; o /= 2) v[j] += __shfl_down_sync(0xffffffffu, v[j], o);
  if (l.group == 32) return;  // the same for every thread of the launch
  if (tid % 32 == 0)
#pragma unroll
    for (int j = 0; j < NP; ++j) smem[j][tid / 32] = v[j];
  __syncthreads();
  if (tid % l.group == 0) {
    const int w0 = part::row_group_warp0(l, tid);
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      T s = T(0);
      for (int w = w0; w < w0 + l.group / 32; ++w) s += smem[j][w];
      v[j] = s;
    }
  }
}

// ---- channel runs (inner > 1): one unit per (n, r, c, segment), parameters fixed,
// walked by a group of l.group threads; a block holds l.per_block groups (partition.h's
// row_launch / row_unit / row_block / row_segment). Backward writes the segment's sums
// to partial[rb.slot * NP + j].

template <template <typename> class OpT, typename scalar_t, typename P, int NP, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    row_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
               ChannelGeometry geo, ParamView<P, NP> pv, part::RowLaunch l, opmath_t<scalar_t>* __restrict__ partial) {
  using T = opmath_t<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  using V = Pack<scalar_t, VEC>;
  constexpr bool kStore = math::kWrites<OpT<T>>;  // not for a pass that only sums
  const int tid = threadIdx.x;
  int t;
  const int64_t u = part::row_unit(l, blockIdx.x, tid, t);
  T acc[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) acc[j] = T(0);
  if (u >= 0) {
    const part::RowBlock rb = part::row_block(l, geo.R, geo.C, geo.inner, u);
    T v[NP];
    pv.load(rb.n, rb.c, v);
    const auto op = OpT<T>::from(v);

    auto one = [&](scalar_t gi, scalar_t xi) -> scalar_t {
      if constexpr (kBackward) {
        T dp[NP];
        const T d = op.template backward<SumsMathFor<scalar_t>>(static_cast<T>(gi), static_cast<T>(xi), dp);
#pragma unroll
        for (int j = 0; j < NP; ++j) acc[j] += dp[j];
        return static_cast<scalar_t>(d);
      } else {
        return static_cast<scalar_t>(op.template forward<MathFor<scalar_t>>(static_cast<T>(xi)));
      }
    };

    const scalar_t* xs = x + rb.off;
    const scalar_t* gs = kBackward ? g + rb.off : nullptr;
    scalar_t* os = out + rb.off;
    const int head = head16(xs);
    const bool packed = head16(os) == head && (!kBackward || head16(gs) == head);
    const auto f = part::row_segment(rb, head, packed, VEC);
    if (packed) {
      // One pack at a time: with both packs' values live across the division's
      // slow-path call, ptxas spilled (the SASS check caught it).
#pragma unroll
      for (int k = 0; k < part::kRowPacks; ++k) {
        const int32_t p = f.pack(0, k, t, l.group);
        if (p < 0) continue;
        const int32_t at = f.pack_start(p);
        const V xv = *reinterpret_cast<const V*>(xs + at);
        V gv, ov;
        if constexpr (kBackward) gv = *reinterpret_cast<const V*>(gs + at);
#pragma unroll
        for (int e = 0; e < VEC; ++e) ov.v[e] = one(kBackward ? gv.v[e] : scalar_t(0), xv.v[e]);
        if constexpr (kStore) *reinterpret_cast<V*>(os + at) = ov;
      }
    } else {
#pragma unroll 4
      for (int k = 0; k < f.ppt; ++k) {
        const int32_t p = f.pack(0, k, t, l.group);
        if (p < 0) continue;
        const scalar_t o = one(kBackward ? gs[p] : scalar_t(0), xs[p]);
        if constexpr (kStore) os[p] = o;
      }
    }
    const int32_t e = f.extra(0, t);
    if (e >= 0) {
      const scalar_t o = one(kBackward ? gs[e] : scalar_t(0), xs[e]);
      if constexpr (kStore) os[e] = o;
    }
  }

  if constexpr (kBackward) {
    group_sum(acc, l, tid);
    if (u >= 0 && t == 0) {
      // the slot found again: kept live across the loop, it made ptxas spill
      const int64_t slot = part::row_block(l, geo.R, geo.C, geo.inner, u).slot;
#pragma unroll
      for (int j = 0; j < NP; ++j) partial[slot * NP + j] = acc[j];
    }
  }
}

// ---- channels innermost (inner == 1: channels_last, (N, L, C)): each thread takes VEC
// adjacent channels (one 16-byte pack per row when C % VEC == 0 and every pointer is
// aligned, else VEC = 1) down its rows; partition.h's channels_launch / channels_thread.

template <template <typename> class OpT, typename scalar_t, typename P, int NP, int VEC, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    channels_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                    ChannelGeometry geo, ParamView<P, NP> pv, part::ChannelsLaunch l,
                    opmath_t<scalar_t>* __restrict__ partial) {
  using T = opmath_t<scalar_t>;
  using V = Pack<scalar_t, VEC>;
  constexpr bool kStore = math::kWrites<OpT<T>>;  // not for a pass that only sums
  const int tx = threadIdx.x, ty = threadIdx.y;
  const part::ChannelsThread th = part::channels_thread(l, geo.R, blockIdx.x, blockIdx.y, tx, ty);
  T acc[NP][VEC];
#pragma unroll
  for (int j = 0; j < NP; ++j)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[j][e] = T(0);
  if (th.c0 < geo.C) {
    T pvals[VEC][NP];
#pragma unroll
    for (int e = 0; e < VEC; ++e) pv.load(th.n, th.c0 + e, pvals[e]);
#pragma unroll 1
    for (int64_t r = th.r_begin; r < th.r_end; r += l.ty) {
      const int64_t i = part::channels_index(geo.R, geo.C, th.n, r, th.c0);
      const V xv = *reinterpret_cast<const V*>(x + i);
      V gv, ov;
      if constexpr (kBackward) gv = *reinterpret_cast<const V*>(g + i);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const auto op = OpT<T>::from(pvals[e]);
        if constexpr (kBackward) {
          T dp[NP];
          ov.v[e] = static_cast<scalar_t>(
              op.template backward<SumsMathFor<scalar_t>>(static_cast<T>(gv.v[e]), static_cast<T>(xv.v[e]), dp));
#pragma unroll
          for (int j = 0; j < NP; ++j) acc[j][e] += dp[j];
        } else {
          ov.v[e] = static_cast<scalar_t>(op.template forward<MathFor<scalar_t>>(static_cast<T>(xv.v[e])));
        }
      }
      if constexpr (kStore) *reinterpret_cast<V*>(out + i) = ov;
    }
  }
  if constexpr (kBackward) {
    // Sum over ty by a fixed tree (blockDim.y is a power of two), then row 0 writes.
    __shared__ T sh[NP][kThreads * VEC];
    const int lane = (ty * blockDim.x + tx) * VEC;
#pragma unroll
    for (int j = 0; j < NP; ++j)
#pragma unroll
      for (int e = 0; e < VEC; ++e) sh[j][lane + e] = acc[j][e];
    __syncthreads();
    for (int s = blockDim.y / 2; s > 0; s /= 2) {
      if (ty < s) {
        const int other = lane + s * blockDim.x * VEC;
#pragma unroll
        for (int j = 0; j < NP; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) sh[j][lane + e] += sh[j][other + e];
      }
      __syncthreads();
    }
    if (ty == 0 && th.c0 < geo.C) {
#pragma unroll
      for (int e = 0; e < VEC; ++e)
#pragma unroll
        for (int j = 0; j < NP; ++j)
          partial[part::channels_slot(l, geo.C, th.n, th.k, th.c0 + e) * NP + j] = sh[j][lane + e];
    }
  }
}

// ---- fixed-order finish: block b sums parameter j's slots for output b (channel c,
// or (sample n, channel c) when per_sample).
template <typename T, int NP>
__global__ void __launch_bounds__(kThreads) finish_kernel(const T* __restrict__ partial, int64_t N, int64_t K,
                                                          int64_t C, int j, bool per_sample, T* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const int64_t items = part::finish_items(N, K, per_sample);
  T sum[1] = {T(0)};
  for (int64_t i = threadIdx.x; i < items; i += blockDim.x)
    sum[0] += partial[part::finish_slot(K, C, per_sample, b, i) * NP + j];
  block_sum(sum);
  if (threadIdx.x == 0) out[b] = sum[0];
}

struct CudaBackend {
  static constexpr bool kGradRowStride = false;  // g walks as x (ops_impl.h, grad_walked)
  template <class Op, typename scalar_t>
  static void forward(const scalar_t* x, scalar_t* y, int64_t n, Op op) {
    launch_elementwise<false>(static_cast<const scalar_t*>(nullptr), x, y, n, op);
  }

  template <class Op, typename scalar_t>
  static void backward(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t n, Op op) {
    launch_elementwise<true>(g, x, dx, n, op);
  }

  // Launches the row or channels kernel; returns K, the partial slots per (n, c).
  template <template <typename> class OpT, bool kBackward, typename scalar_t, typename P, int NP>
  static int64_t launch_channels(const scalar_t* g, const scalar_t* x, scalar_t* out, const ChannelGeometry& geo,
                                 ParamView<P, NP> pv, opmath_t<scalar_t>* partial, bool dry_run) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    constexpr int VEC = vec_size<scalar_t>();
    if (geo.inner > 1) {
      const part::RowLaunch l = part::row_launch(geo.N, geo.R, geo.C, geo.inner, VEC);
      // row_block divides the unit index in 32 bits: it must stay below 2^31.
      TORCH_CHECK(l.units <= std::numeric_limits<int32_t>::max(), "fusedact: ", l.units, " row segments (runs of ",
                  geo.inner, " elements) exceed the CUDA grid");
      if (dry_run) return l.K;
      row_kernel<OpT, scalar_t, P, NP, kBackward>
          <<<static_cast<unsigned>(l.blocks), l.threads, 0, stream>>>(g, x, out, geo, pv, l, partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return l.K;
    }
    constexpr int CVEC = channels_vec_size<scalar_t>();
    const bool aligned = head16(x) == 0 && head16(out) == 0 && (!kBackward || head16(g) == 0);
    const int vec = part::channels_vec(geo.C, CVEC, aligned);
    const part::ChannelsLaunch l = part::channels_launch(geo.N, geo.R, geo.C, vec);
    TORCH_CHECK(l.grid_x <= std::numeric_limits<int32_t>::max() && l.grid_y <= 65535, "fusedact: ", geo.C,
                " channels by ", geo.N * geo.R, " rows exceed the CUDA grid");
    if (dry_run) return l.K;
    const dim3 grid(static_cast<unsigned>(l.grid_x), static_cast<unsigned>(l.grid_y));
    const dim3 block(l.tx, l.ty);
    if (vec == CVEC)
      channels_kernel<OpT, scalar_t, P, NP, CVEC, kBackward>
          <<<grid, block, 0, stream>>>(g, x, out, geo, pv, l, partial);
    else
      channels_kernel<OpT, scalar_t, P, NP, 1, kBackward><<<grid, block, 0, stream>>>(g, x, out, geo, pv, l, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return l.K;
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static void channel_forward(const scalar_t* x, scalar_t* y, const ChannelGeometry& geo, ParamView<P, NP> pv) {
    launch_channels<OpT, false>(static_cast<const scalar_t*>(nullptr), x, y, geo, pv, nullptr, false);
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static std::array<at::Tensor, NP> channel_backward(const scalar_t* g, const scalar_t* x, scalar_t* dx,
                                                     const ChannelGeometry& geo, ParamView<P, NP> pv,
                                                     const at::TensorOptions& options) {
    using T = opmath_t<scalar_t>;
    const auto acc_options = options.dtype(c10::CppTypeToScalarType<T>::value);
    std::array<at::Tensor, NP> out;
    for (int j = 0; j < NP; ++j) out[j] = at::zeros({pv.n_stride[j] ? geo.N * geo.C : geo.C}, acc_options);
    if (geo.R * geo.inner * geo.C == 0) return out;
    const int64_t K = launch_channels<OpT, true>(g, x, dx, geo, pv, static_cast<T*>(nullptr), true);
    at::Tensor partial = at::empty({geo.N * K * geo.C * NP}, acc_options);
    launch_channels<OpT, true>(g, x, dx, geo, pv, partial.data_ptr<T>(), false);
    auto stream = c10::cuda::getCurrentCUDAStream();
    for (int j = 0; j < NP; ++j) {
      const bool per_sample = pv.n_stride[j] != 0;
      finish_kernel<T, NP><<<static_cast<unsigned>(out[j].numel()), kThreads, 0, stream>>>(
          partial.data_ptr<T>(), geo.N, K, geo.C, j, per_sample, out[j].template data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return out;
  }
};

}  // namespace
}  // namespace fusedact

FUSEDACT_REGISTER_BACKEND(CUDA, fusedact::CudaBackend)
// batch_norm_act's passes; fusedact/batch_norm.py composes the statistics and the
// per-channel arithmetic from them on the device (no host loop, no sync).
FUSEDACT_REGISTER_BN_PASSES(CUDA, fusedact::CudaBackend)
