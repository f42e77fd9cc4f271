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

namespace fusedact {
namespace {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

constexpr int kThreads = 256;
constexpr int kPacksPerThread = 4;  // a row segment is kThreads * kPacksPerThread packs
constexpr int64_t kRowsPerBlock = 64;  // channels-last: rows summed by one block

template <typename scalar_t>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A grid-stride launch needs no more than this many blocks: 32 per SM. The SM count
// is asked once per device (a benign race: every writer stores the same value).
int max_blocks() {
  static std::atomic<int> sm_count[C10_COMPILE_TIME_MAX_GPUS] = {};
  const int dev = c10::cuda::current_device();
  int sms = sm_count[dev].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    sm_count[dev].store(sms, std::memory_order_relaxed);
  }
  return sms * 32;
}

// ---- flat elementwise: y = op.forward(x), or dx = op.backward(g, x)

template <class Op, typename scalar_t, int VEC, typename index_t, bool kBackward>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                   scalar_t* __restrict__ out, index_t n, Op op) {
  using T = opmath_t<scalar_t>;
  using V = Pack<scalar_t, VEC>;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t tid = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t nvec = n / VEC;
  for (index_t i = tid; i < nvec; i += stride) {
    const V xv = reinterpret_cast<const V*>(x)[i];
    V gv, ov;
    if constexpr (kBackward) gv = reinterpret_cast<const V*>(g)[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if constexpr (kBackward)
        ov.v[k] = static_cast<scalar_t>(
            op.backward(static_cast<T>(gv.v[k]), static_cast<T>(xv.v[k])));
      else
        ov.v[k] = static_cast<scalar_t>(op.forward(static_cast<T>(xv.v[k])));
    }
    reinterpret_cast<V*>(out)[i] = ov;
  }
  for (index_t i = nvec * VEC + tid; i < n; i += stride) {
    if constexpr (kBackward)
      out[i] = static_cast<scalar_t>(op.backward(static_cast<T>(g[i]), static_cast<T>(x[i])));
    else
      out[i] = static_cast<scalar_t>(op.forward(static_cast<T>(x[i])));
  }
}

template <bool kBackward, class Op, typename scalar_t>
void launch_elementwise(const scalar_t* g, const scalar_t* x, scalar_t* out, int64_t n, Op op) {
  constexpr int V = vec_size<scalar_t>();
  const bool vec = aligned16(x) && aligned16(out) && (!kBackward || aligned16(g));
  const int64_t work = vec ? ceil_div(n, V) : n;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(work, kThreads), max_blocks()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  // 32-bit indices while i + stride cannot overflow them.
  const bool small = n <= std::numeric_limits<int32_t>::max() / 2;
  if (vec && small)
    elementwise_kernel<Op, scalar_t, V, int32_t, kBackward>
        <<<blocks, kThreads, 0, stream>>>(g, x, out, static_cast<int32_t>(n), op);
  else if (vec)
    elementwise_kernel<Op, scalar_t, V, int64_t, kBackward><<<blocks, kThreads, 0, stream>>>(g, x, out, n, op);
  else if (small)
    elementwise_kernel<Op, scalar_t, 1, int32_t, kBackward>
        <<<blocks, kThreads, 0, stream>>>(g, x, out, static_cast<int32_t>(n), op);
  else
    elementwise_kernel<Op, scalar_t, 1, int64_t, kBackward><<<blocks, kThreads, 0, stream>>>(g, x, out, n, op);
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

// ---- channel runs (inner > 1): one block per (row, segment), parameters fixed.
// Backward writes the segment's sums to partial[((n * K + r * segs + s) * C + c) * NP + j].

template <template <typename> class OpT, typename scalar_t, typename P, int NP, bool kBackward>
__global__ void __launch_bounds__(kThreads)
row_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
           scalar_t* __restrict__ out, ChannelGeometry geo, ParamView<P, NP> pv,
           int64_t seg_len, int64_t segs, opmath_t<scalar_t>* __restrict__ partial) {
  using T = opmath_t<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  using V = Pack<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t s = t % segs, row = t / segs;
  const int64_t c = row % geo.C, nr = row / geo.C;
  const int64_t n = nr / geo.R, r = nr % geo.R;
  const int64_t begin = s * seg_len;
  const int64_t len = min(seg_len, geo.inner - begin);
  const int64_t off = row * geo.inner + begin;
  T v[NP];
  pv.load(n, c, v);
  const auto op = OpT<T>::from(v);
  T acc[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) acc[j] = T(0);

  auto one = [&](scalar_t gi, scalar_t xi) -> scalar_t {
    if constexpr (kBackward) {
      T dp[NP];
      const T d = op.backward(static_cast<T>(gi), static_cast<T>(xi), dp);
#pragma unroll
      for (int j = 0; j < NP; ++j) acc[j] += dp[j];
      return static_cast<scalar_t>(d);
    } else {
      return static_cast<scalar_t>(op.forward(static_cast<T>(xi)));
    }
  };

  const scalar_t* xs = x + off;
  const scalar_t* gs = kBackward ? g + off : nullptr;
  scalar_t* os = out + off;
  int64_t done = 0;
  if (aligned16(xs) && aligned16(os) && (!kBackward || aligned16(gs))) {
    const int64_t nv = len / VEC;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      const V xv = reinterpret_cast<const V*>(xs)[i];
      V gv, ov;
      if constexpr (kBackward) gv = reinterpret_cast<const V*>(gs)[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) ov.v[k] = one(kBackward ? gv.v[k] : scalar_t(0), xv.v[k]);
      reinterpret_cast<V*>(os)[i] = ov;
    }
    done = nv * VEC;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x)
    os[i] = one(kBackward ? gs[i] : scalar_t(0), xs[i]);

  if constexpr (kBackward) {
    block_sum(acc);
    if (threadIdx.x == 0) {
      const int64_t K = geo.R * segs;
      T* slot = partial + ((n * K + r * segs + s) * geo.C + c) * NP;
#pragma unroll
      for (int j = 0; j < NP; ++j) slot[j] = acc[j];
    }
  }
}

// ---- rows of C channels (inner == 1: channels_last, (N, L, C)): a 32 x 8 block
// covers 32 channels (coalesced) and kRowsPerBlock rows of one sample.

template <template <typename> class OpT, typename scalar_t, typename P, int NP, bool kBackward>
__global__ void __launch_bounds__(kThreads)
channels_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                scalar_t* __restrict__ out, ChannelGeometry geo, ParamView<P, NP> pv, int64_t K,
                opmath_t<scalar_t>* __restrict__ partial) {
  using T = opmath_t<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  const int64_t t = blockIdx.x;
  const int64_t n = t / K, k = t % K;
  const int64_t r_end = min(geo.R, (k + 1) * kRowsPerBlock);
  T acc[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) acc[j] = T(0);
  if (c < geo.C) {
    T v[NP];
    pv.load(n, c, v);
    const auto op = OpT<T>::from(v);
    for (int64_t r = k * kRowsPerBlock + threadIdx.y; r < r_end; r += blockDim.y) {
      const int64_t i = (n * geo.R + r) * geo.C + c;
      if constexpr (kBackward) {
        T dp[NP];
        out[i] = static_cast<scalar_t>(op.backward(static_cast<T>(g[i]), static_cast<T>(x[i]), dp));
#pragma unroll
        for (int j = 0; j < NP; ++j) acc[j] += dp[j];
      } else {
        out[i] = static_cast<scalar_t>(op.forward(static_cast<T>(x[i])));
      }
    }
  }
  if constexpr (kBackward) {
    __shared__ T sh[NP][8][33];
#pragma unroll
    for (int j = 0; j < NP; ++j) sh[j][threadIdx.y][threadIdx.x] = acc[j];
    __syncthreads();
    if (threadIdx.y == 0 && c < geo.C) {
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        T sum = 0;
        for (int y = 0; y < 8; ++y) sum += sh[j][y][threadIdx.x];
        partial[((n * K + k) * geo.C + c) * NP + j] = sum;
      }
    }
  }
}

// ---- fixed-order finish: block b sums parameter j's slots for output b (channel c,
// or (sample n, channel c) when per_sample).
template <typename T, int NP>
__global__ void __launch_bounds__(kThreads)
finish_kernel(const T* __restrict__ partial, int64_t N, int64_t K, int64_t C, int j,
              bool per_sample, T* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const int64_t c = b % C;
  const int64_t n0 = per_sample ? b / C : 0;
  const int64_t items = per_sample ? K : N * K;  // (n, k) pairs, n from n0
  T sum[1] = {T(0)};
  for (int64_t i = threadIdx.x; i < items; i += blockDim.x) {
    const int64_t nk = n0 * K + i;
    sum[0] += partial[(nk * C + c) * NP + j];
  }
  block_sum(sum);
  if (threadIdx.x == 0) out[b] = sum[0];
}

struct CudaBackend {
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
  static int64_t launch_channels(const scalar_t* g, const scalar_t* x, scalar_t* out,
                                 const ChannelGeometry& geo, ParamView<P, NP> pv,
                                 opmath_t<scalar_t>* partial, bool dry_run) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    constexpr int VEC = vec_size<scalar_t>();
    if (geo.inner > 1) {
      const int64_t seg_len = int64_t(kThreads) * kPacksPerThread * VEC;
      const int64_t segs = ceil_div(geo.inner, seg_len);
      if (dry_run) return geo.R * segs;
      const int64_t blocks = geo.N * geo.R * geo.C * segs;
      // A short run gets a narrower block (a multiple of a warp).
      const int64_t need = ceil_div(std::min(geo.inner, seg_len), VEC);
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(need, 32) * 32));
      row_kernel<OpT, scalar_t, P, NP, kBackward>
          <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(g, x, out, geo, pv, seg_len, segs, partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return geo.R * segs;
    }
    const int64_t K = ceil_div(geo.R, kRowsPerBlock);
    if (dry_run) return K;
    const dim3 grid(static_cast<unsigned>(geo.N * K), static_cast<unsigned>(ceil_div(geo.C, 32)));
    channels_kernel<OpT, scalar_t, P, NP, kBackward>
        <<<grid, dim3(32, 8), 0, stream>>>(g, x, out, geo, pv, K, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return K;
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static void channel_forward(const scalar_t* x, scalar_t* y, const ChannelGeometry& geo,
                              ParamView<P, NP> pv) {
    launch_channels<OpT, false>(static_cast<const scalar_t*>(nullptr), x, y, geo, pv, nullptr,
                                false);
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static std::array<at::Tensor, NP> channel_backward(const scalar_t* g, const scalar_t* x,
                                                     scalar_t* dx, const ChannelGeometry& geo,
                                                     ParamView<P, NP> pv,
                                                     const at::TensorOptions& options) {
    using T = opmath_t<scalar_t>;
    const auto acc_options = options.dtype(c10::CppTypeToScalarType<T>::value);
    std::array<at::Tensor, NP> out;
    for (int j = 0; j < NP; ++j)
      out[j] = at::zeros({pv.n_stride[j] ? geo.N * geo.C : geo.C}, acc_options);
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
