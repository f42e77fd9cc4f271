// CPU backend: loops over activation_math.h, parallel with at::parallel_for. Each
// chunk loop is compiled three times, for AVX-512, for AVX2+FMA and for baseline x86-64,
// and the best the CPU can run is picked at run time (as ATen picks its kernels); the
// compiler vectorizes each (the math header has no libm calls for float), `#pragma omp
// simd` telling it that it may.
//
// Parameter gradients are deterministic: every task writes its opmath partial sums to
// its own slot of a [N][K][C][NP] buffer, and a fixed-order pass adds them up, so the
// result does not depend on the thread count or scheduling.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../ops_impl.h"
#include "cpu_isa.h"

namespace fusedact {

// ---- instruction set

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDACT_X86_PATHS 1
// F16C (every AVX2 CPU has it): float16 <-> float, 8 at a time, as ATen's Vectorized<Half>.
#define FUSEDACT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX-512 with the 512-bit vectors (F for the arithmetic, BW for 16-bit lanes, DQ and VL
// for the conversions and masked tails): the ISA of ATen's own AVX512 kernels.
#define FUSEDACT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")))
#endif

bool cpu_supports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Baseline:
      return true;
#ifdef FUSEDACT_X86_PATHS
    case CpuIsa::Avx2: {
      static const bool has = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
      }();
      return has;
    }
    case CpuIsa::Avx512: {
      // __builtin_cpu_supports also checks that the OS saves the 512-bit state.
      static const bool has = [] {
        __builtin_cpu_init();
        return cpu_supports(CpuIsa::Avx2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl");
      }();
      return has;
    }
#endif
    default:
      return false;
  }
}

std::vector<CpuIsa> cpu_isas_available() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512})
    if (cpu_supports(isa)) out.push_back(isa);
  return out;
}

std::string cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Avx512: return "avx512";
    default: return "baseline";
  }
}

bool cpu_isa_from_name(const std::string& name, CpuIsa& isa) {
  for (CpuIsa candidate : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512})
    if (name == cpu_isa_name(candidate)) {
      isa = candidate;
      return true;
    }
  return false;
}

namespace {
// The best the CPU runs, unless FUSEDACT_CPU_ISA names one it can run (a name it cannot
// run, or an unknown one, is ignored: the library must load everywhere).
CpuIsa initial_isa() {
  CpuIsa isa = cpu_isas_available().back();
  if (const char* env = std::getenv("FUSEDACT_CPU_ISA")) {
    CpuIsa wanted;
    if (cpu_isa_from_name(env, wanted) && cpu_supports(wanted)) isa = wanted;
  }
  return isa;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}
}  // namespace

CpuIsa cpu_isa() { return static_cast<CpuIsa>(isa_slot().load(std::memory_order_relaxed)); }

bool set_cpu_isa(CpuIsa isa) {
  if (!cpu_supports(isa)) return false;
  isa_slot().store(static_cast<int>(isa));
  return true;
}

// ---- store mode

namespace {
// Whether the page holding p is in memory (yes on an error, or without mincore).
bool page_resident(const void* p) {
#ifdef __linux__
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  unsigned char in = 0;
  void* start = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) & ~(page - 1));
  return mincore(start, 1, &in) != 0 || (in & 1);
#else
  (void)p;
  return true;
#endif
}

// Non-temporal stores go only into pages already in memory. An output mapped anew
// (glibc maps each allocation of 32 MiB or more afresh, and unmaps it when the tensor
// dies) is faulted in by the stores themselves, the kernel zeroing each page first, and
// cached stores then win: 5-10% at 16-64 MiB here. glibc writes its chunk header on the
// first page, so the middle and the last page of the n elements are asked.
template <typename scalar_t>
bool pages_in(const scalar_t* out, int64_t n) {
  return page_resident(out + n / 2) && page_resident(out + n - 1);
}

CpuStores initial_stores() {
  CpuStores mode = CpuStores::Auto;
  if (const char* env = std::getenv("FUSEDACT_CPU_STORES")) cpu_stores_from_name(env, mode);
  return mode;
}
std::atomic<int>& stores_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_stores())};
  return slot;
}
}  // namespace

CpuStores cpu_stores() { return static_cast<CpuStores>(stores_slot().load(std::memory_order_relaxed)); }
void set_cpu_stores(CpuStores mode) { stores_slot().store(static_cast<int>(mode)); }
bool cpu_pages_in(const void* p, int64_t bytes) {
  return bytes <= 0 || pages_in(static_cast<const char*>(p), bytes);
}

std::string cpu_stores_name(CpuStores mode) {
  switch (mode) {
    case CpuStores::Streaming: return "streaming";
    case CpuStores::Cached: return "cached";
    default: return "auto";
  }
}

bool cpu_stores_from_name(const std::string& name, CpuStores& mode) {
  for (CpuStores candidate : {CpuStores::Auto, CpuStores::Streaming, CpuStores::Cached})
    if (name == cpu_stores_name(candidate)) {
      mode = candidate;
      return true;
    }
  return false;
}

namespace {

#define FUSEDACT_ALWAYS_INLINE inline __attribute__((always_inline))
// For the per-element lambdas: GCC left some uninlined (the float16 loops of swish, SiLU
// and mish), and an uninlined one is compiled for the default target, without the
// caller's vector instructions.
#define FUSEDACT_LAMBDA_INLINE __attribute__((always_inline))

// Kernel::run<kVector> is always inlined into these, so its loops are compiled for each
// target; nothing from ATen is inlined there. kVector says that the target has AVX2
// (the streaming stores' intrinsics), which AVX-512 includes.
#ifdef FUSEDACT_X86_PATHS
template <typename Kernel, typename... Args>
FUSEDACT_TARGET_AVX512 void run_avx512(Args... args) {
  Kernel::template run<true>(args...);
}
template <typename Kernel, typename... Args>
FUSEDACT_TARGET_AVX2 void run_avx2(Args... args) {
  Kernel::template run<true>(args...);
}
#endif
template <typename Kernel, typename... Args>
void run_baseline(Args... args) {
  Kernel::template run<false>(args...);
}
template <typename Kernel, typename... Args>
void run_chunk(Args... args) {
#ifdef FUSEDACT_X86_PATHS
  switch (cpu_isa()) {
    case CpuIsa::Avx512: return run_avx512<Kernel>(args...);
    case CpuIsa::Avx2: return run_avx2<Kernel>(args...);
    default: break;
  }
#endif
  run_baseline<Kernel>(args...);
}

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// float16 <-> float. On the AVX2 and AVX-512 targets the flat loops convert blocks with
// F16C (floats_to_halves, halves_to_floats); elsewhere, and for the few elements left
// over, these lane operations, which the compiler vectorizes: c10's
// fp16_ieee_to_fp32_value and fp16_ieee_from_fp32_value (exact one way, round to
// nearest even the other, as F16C's), on the bits read through a uint16_t pointer; a
// NaN keeps its sign and the top of its payload, as with vcvtps2ph (c10 writes 0x7E00).
// Through c10::Half itself GCC vectorized none of the float16 loops ("complicated
// access pattern"), and they ran at 0.6x (hard_swish) to 0.9x (swish) of ATen's; GCC 12
// vectorizes no _Float16 conversion either.
typedef uint16_t half_bits_alias __attribute__((may_alias));
using math::bits_to_float;
using math::float_to_bits;

FUSEDACT_ALWAYS_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
  const uint32_t bits = two_w < (UINT32_C(1) << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | bits);
}

FUSEDACT_ALWAYS_INLINE uint16_t float_to_half_bits(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  bias = bias < UINT32_C(0x71000000) ? UINT32_C(0x71000000) : bias;
  base = bits_to_float((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t b = float_to_bits(base);
  const uint32_t nonsign = ((b >> 13) & UINT32_C(0x00007C00)) + (b & UINT32_C(0x00000FFF));
  const uint32_t nan = UINT32_C(0x7E00) | ((w >> 13) & UINT32_C(0x3FF));
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? nan : nonsign));
}

// p[i] as opmath.
template <typename scalar_t>
FUSEDACT_ALWAYS_INLINE opmath_t<scalar_t> load(const scalar_t* p, int64_t i) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return half_bits_to_float(reinterpret_cast<const half_bits_alias*>(p)[i]);
  } else {
    return static_cast<opmath_t<scalar_t>>(p[i]);
  }
}

// opmath -> the tensor's dtype. bfloat16 rounds to nearest even from the bits, with NaN
// a quiet NaN: c10's conversion, bit for bit, but with a select where c10 branches,
// which kept GCC from vectorizing the loops that also reduce (7-15x slower).
template <typename scalar_t, typename T>
FUSEDACT_ALWAYS_INLINE scalar_t to_scalar(T v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
    const uint16_t bits = v != v ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
    return c10::BFloat16(bits, c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// p[i] = v, opmath -> the tensor's dtype.
template <typename scalar_t, typename T>
FUSEDACT_ALWAYS_INLINE void store(scalar_t* p, int64_t i, T v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<T, float>) {
    reinterpret_cast<half_bits_alias*>(p)[i] = float_to_half_bits(v);
  } else {
    p[i] = to_scalar<scalar_t>(v);
  }
}

// f(j) for j = 0 .. NP-1, each j a compile-time constant (std::integral_constant).
template <int NP, typename F>
FUSEDACT_ALWAYS_INLINE void for_each_param(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) {
    (f(std::integral_constant<int, J>{}), ...);
  }(std::make_integer_sequence<int, NP>{});
}

// ---- stores

// Large outputs go to memory with non-temporal stores when they could not stay in the
// last-level cache beside their inputs anyway: a normal store first reads the line it
// writes (read for ownership), a third more memory traffic for a forward, a quarter for
// a backward. Forward: output >= 24 MiB (input and output 1.5 times this machine's
// 32 MiB L3). Streaming stores also take the same time whichever physical pages the
// output got; cached ones do not: at (32, 64, 56, 56) float32 (24.5 MiB) the cached
// hard_swish forward ran 0.29-0.37 ms or 0.56-0.78 ms (fast and slow memory states) by
// the process and the buffer, 0.75x-1.17x of ATen's (cached too), streaming 0.30 and
// 0.60 ms. At 16-20 MiB streaming measured 0.66x-1.2x of cached. Backward: g, x and dx
// >= 64 MiB together, and only for a memory-bound loop (hard_swish): with an exp per
// element (swish, mish) the backward measured 5-15% slower with streaming stores.
constexpr int64_t kStreamBytes = int64_t(24) << 20;
constexpr int64_t kStreamBackwardBytes = int64_t(64) << 20;

// Whether an output of n elements is written with non-temporal stores: by the rules
// above (auto), or always or never (FUSEDACT_CPU_STORES, set_cpu_stores).
template <typename scalar_t>
bool stream_output(const scalar_t* out, int64_t n, bool large) {
  switch (cpu_stores()) {
    case CpuStores::Streaming: return true;
    case CpuStores::Cached: return false;
    default: return large && pages_in(out, n);
  }
}
template <typename scalar_t>
bool stream_forward_output(const scalar_t* y, int64_t n) {
  return stream_output(y, n, n * int64_t(sizeof(scalar_t)) >= kStreamBytes);
}

template <class Op>
constexpr bool kStreamBackward = false;
template <typename T>
constexpr bool kStreamBackward<math::HardSwish<T>> = true;

#ifdef FUSEDACT_X86_PATHS
FUSEDACT_TARGET_AVX2 inline void stream_32B_blocks(void* dst, const void* src, int64_t bytes) {
  for (int64_t k = 0; k < bytes; k += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<char*>(dst) + k),
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(static_cast<const char*>(src) + k)));
}

// n float16 -> float and back with F16C (round to nearest even), the float side 64-byte
// aligned: 8 at a time at AVX2, 16 at AVX-512, the last n % 8 by load/store. One call
// per block of up to 512 elements, by the instruction set in use (GCC inlines across
// targets only into a superset with the same tuning).
FUSEDACT_TARGET_AVX2 int64_t halves_to_floats_avx2(const c10::Half* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm256_store_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  return k;
}
FUSEDACT_TARGET_AVX2 int64_t floats_to_halves_avx2(const float* src, c10::Half* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                     _mm256_cvtps_ph(_mm256_load_ps(src + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return k;
}
FUSEDACT_TARGET_AVX512 int64_t halves_to_floats_avx512(const c10::Half* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    _mm512_store_ps(dst + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))));
  return k + halves_to_floats_avx2(src + k, dst + k, n - k);
}
FUSEDACT_TARGET_AVX512 int64_t floats_to_halves_avx512(const float* src, c10::Half* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                        _mm512_cvtps_ph(_mm512_load_ps(src + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return k + floats_to_halves_avx2(src + k, dst + k, n - k);
}
inline void halves_to_floats(const c10::Half* src, float* dst, int64_t n) {
  int64_t k = cpu_isa() == CpuIsa::Avx512 ? halves_to_floats_avx512(src, dst, n) : halves_to_floats_avx2(src, dst, n);
  for (; k < n; ++k) dst[k] = load(src, k);
}
inline void floats_to_halves(const float* src, c10::Half* dst, int64_t n) {
  int64_t k = cpu_isa() == CpuIsa::Avx512 ? floats_to_halves_avx512(src, dst, n) : floats_to_halves_avx2(src, dst, n);
  for (; k < n; ++k) store(dst, k, src[k]);
}
#endif

// Whether a loop converts float16 blocks with F16C (halves_to_floats, floats_to_halves).
template <bool kVector, typename scalar_t>
constexpr bool kF16c =
#ifdef FUSEDACT_X86_PATHS
    kVector && std::is_same_v<scalar_t, c10::Half>;
#else
    false;
#endif

// dst[j] = f(i + j), rounded to scalar_t, for j < len (f gives opmath values). A
// float16/bfloat16 result is computed into an opmath buffer and rounded in a second
// loop: with the rounding in the same loop as the math, GCC interleaved 16- and 32-bit
// lanes, and the AVX-512 bfloat16 loops ran 1.3x slower (hard_swish forward, 2^20).
constexpr int64_t kBlockBytes = 1024;

// kLen > 0: a block of exactly kLen elements (len is ignored), which the compiler unrolls.
template <int64_t kLen, bool kVector, typename scalar_t, typename F>
FUSEDACT_ALWAYS_INLINE void compute_block(scalar_t* dst, int64_t i, int64_t len, F& f) {
  using T = opmath_t<scalar_t>;
  const int64_t m = kLen > 0 ? kLen : len;
  if constexpr (std::is_same_v<scalar_t, T>) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) dst[j] = f(i + j);
  } else {
    constexpr int64_t kBuf = kBlockBytes / sizeof(scalar_t);
    alignas(64) T buf[kBuf];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) buf[j] = f(i + j);
#ifdef FUSEDACT_X86_PATHS
    if constexpr (kF16c<kVector, scalar_t>) {
      floats_to_halves(buf, dst, m);
      return;
    }
#endif
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) store(dst, j, buf[j]);
  }
}

// out[i] = f(i) for i < n, the half types in blocks of kBlockBytes of output (float and
// double in one loop: blocks of four vectors measured slower there, the compiler checking
// for aliasing in every block). With kVector and `stream`, blocks computed into an
// aligned buffer are written with non-temporal 32-byte stores.
template <bool kVector, typename scalar_t, typename F>
FUSEDACT_ALWAYS_INLINE void store_all(scalar_t* out, int64_t n, bool stream, F f) {
  constexpr int64_t kBlock = kBlockBytes / sizeof(scalar_t);
  int64_t i = 0;
#ifdef FUSEDACT_X86_PATHS
  if constexpr (kVector) {
    if (stream) {
      const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % 32);
      const int64_t head = misalign % sizeof(scalar_t) ? n : std::min(n, ((32 - misalign) % 32) / int64_t(sizeof(scalar_t)));
      compute_block<0, kVector>(out, 0, head, f);
      alignas(32) scalar_t buf[kBlock];
      for (i = head; i + kBlock <= n; i += kBlock) {
        compute_block<kBlock, kVector>(buf, i, kBlock, f);
        stream_32B_blocks(out + i, buf, sizeof buf);
      }
      _mm_sfence();
    }
  }
#endif
  if constexpr (!std::is_same_v<scalar_t, opmath_t<scalar_t>>) {
    for (; i + kBlock <= n; i += kBlock) compute_block<kBlock, kVector>(out + i, i, kBlock, f);
  }
  compute_block<0, kVector>(out + i, i, n - i, f);
}

// ---- chunk loops

template <class Op, typename scalar_t>
struct ForwardLoop {
  template <bool kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, scalar_t* y, int64_t n, Op op, bool stream) {
#ifdef FUSEDACT_X86_PATHS
    if constexpr (kF16c<kVector, scalar_t>) {  // x in blocks converted with F16C
      constexpr int64_t kB = kBlockBytes / sizeof(scalar_t);
      alignas(64) float xb[kB];
      for (int64_t b = 0; b < n; b += kB) {
        const int64_t m = std::min(kB, n - b);
        halves_to_floats(x + b, xb, m);
        store_all<kVector>(y + b, m, stream, [&](int64_t j) FUSEDACT_LAMBDA_INLINE { return op.forward(xb[j]); });
      }
      return;
    }
#endif
    store_all<kVector>(y, n, stream, [=](int64_t i) FUSEDACT_LAMBDA_INLINE { return op.forward(load(x, i)); });
  }
};

template <class Op, typename scalar_t>
struct BackwardLoop {
  template <bool kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx,
                                         int64_t n, Op op, bool stream) {
#ifdef FUSEDACT_X86_PATHS
    if constexpr (kF16c<kVector, scalar_t>) {  // g and x in blocks converted with F16C
      constexpr int64_t kB = kBlockBytes / sizeof(scalar_t);
      alignas(64) float gb[kB], xb[kB];
      for (int64_t b = 0; b < n; b += kB) {
        const int64_t m = std::min(kB, n - b);
        halves_to_floats(g + b, gb, m);
        halves_to_floats(x + b, xb, m);
        store_all<kVector>(dx + b, m, stream, [&](int64_t j) FUSEDACT_LAMBDA_INLINE { return op.backward(gb[j], xb[j]); });
      }
      return;
    }
#endif
    store_all<kVector>(dx, n, stream, [=](int64_t i) FUSEDACT_LAMBDA_INLINE {
      return op.backward(load(g, i), load(x, i));
    });
  }
};

// dx over a run with one set of parameters, and the run's sums of g * dy/dparam:
// kLanes independent accumulators (vector lanes), added in a fixed order at the end.
template <class Op, typename scalar_t>
struct ReduceBackwardLoop {
  static constexpr int NP = Op::kParams;
  static constexpr int kLanes = 16;
  using T = opmath_t<scalar_t>;

  template <bool kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx,
                                         int64_t n, Op op, T* sums) {
    T acc[NP][kLanes] = {};
    const int64_t nv = n - n % kLanes;
    for (int64_t i = 0; i < nv; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        T dp[NP];
        store(dx, i + l, op.backward(load(g, i + l), load(x, i + l), dp));
        for_each_param<NP>([&](auto j) { acc[j][l] += dp[j]; });
      }
    }
    for (int64_t i = nv; i < n; ++i) {
      T dp[NP];
      store(dx, i, op.backward(load(g, i), load(x, i), dp));
      for_each_param<NP>([&](auto j) { acc[j][i - nv] += dp[j]; });
    }
    for (int j = 0; j < NP; ++j) {
      T s = 0;
      for (int l = 0; l < kLanes; ++l) s += acc[j][l];
      sums[j] = s;
    }
  }
};

// Runs of `inner` elements that share a channel (NCHW-like), rows [begin, end) of the
// [N][R][C] runs taken in one call: with short maps (7x7, 14x14) a call per run cost more
// than its math. Row `row` is of channel row % C and sample row / (R C).
template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct RunsForwardLoop {
  template <bool kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, scalar_t* y, int64_t inner, int64_t C,
                                         int64_t RC, ParamView<P, NP> pv, int64_t begin,
                                         int64_t end, bool stream) {
    using T = opmath_t<scalar_t>;
    for (int64_t row = begin; row < end; ++row) {
      T v[NP];
      pv.load(row / RC, row % C, v);
      ForwardLoop<OpT<T>, scalar_t>::template run<kVector>(x + row * inner, y + row * inner, inner,
                                                           OpT<T>::from(v), stream);
    }
  }
};

// The same rows backward; sums[(row - begin) * NP + j] gets the run's sum for parameter j.
template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct RunsBackwardLoop {
  using T = opmath_t<scalar_t>;
  template <bool kVector>
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx,
                                         int64_t inner, int64_t C, int64_t RC, ParamView<P, NP> pv,
                                         int64_t begin, int64_t end, T* sums) {
    for (int64_t row = begin; row < end; ++row) {
      T v[NP];
      pv.load(row / RC, row % C, v);
      const int64_t off = row * inner;
      ReduceBackwardLoop<OpT<T>, scalar_t>::template run<kVector>(
          g + off, x + off, dx + off, inner, OpT<T>::from(v), sums + (row - begin) * NP);
    }
  }
};

// One row of C consecutive channels (channels_last, (N, L, C)): the parameters change
// with every element. The op is built from NP scalar loads (row_params, op_at) and the
// parameter terms are added with compile-time indices (for_each_param): an array
// indexed by a loop variable inside the simd loop keeps GCC from vectorizing it, and
// the loop then ran 8-14x slower than the NCHW one.
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

template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct ChannelsForwardLoop {
  template <bool kVector>
  // Rows [begin, end) of C elements; row r is of sample r / R.
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* x, scalar_t* y, int64_t C,
                                         ParamView<P, NP> pv, int64_t R, int64_t begin, int64_t end) {
    using T = opmath_t<scalar_t>;
    for (int64_t row = begin; row < end; ++row) {
      const RowParams<P, NP> rp = row_params(pv, row / R);
      const scalar_t* xr = x + row * C;
      store_all<kVector>(y + row * C, C, false, [&](int64_t c) FUSEDACT_LAMBDA_INLINE {
        return op_at<OpT, T>(rp, c).forward(load(xr, c));
      });
    }
  }
};

// acc[j * C + c] += g * dy/dparam_j for the row's channel c.
template <template <typename> class OpT, typename scalar_t, typename P, int NP>
struct ChannelsBackwardLoop {
  using T = opmath_t<scalar_t>;
  template <bool kVector>
  // `rows` consecutive rows of C elements, all of sample n.
  static FUSEDACT_ALWAYS_INLINE void run(const scalar_t* g, const scalar_t* x, scalar_t* dx,
                                         int64_t C, ParamView<P, NP> pv, int64_t n, int64_t rows,
                                         T* acc) {
    const RowParams<P, NP> rp = row_params(pv, n);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* gr = g + r * C;
      const scalar_t* xr = x + r * C;
      store_all<kVector>(dx + r * C, C, false, [&](int64_t c) FUSEDACT_LAMBDA_INLINE {
        T dp[NP];
        const T v = op_at<OpT, T>(rp, c).backward(load(gr, c), load(xr, c), dp);
        for_each_param<NP>([&](auto j) { acc[j * C + c] += dp[j]; });
        return v;
      });
    }
  }
};

// ---- the backend

constexpr int64_t kGrain = 32768;    // elements per parallel task, at least
constexpr int64_t kSegment = 16384;  // elements per partial sum along a channel run

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct CpuBackend {
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
        f(nr / geo.R, nr % geo.R, c, s, segs, row * geo.inner + begin,
          std::min(kSegment, geo.inner - begin));
      }
    });
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static void channel_forward(const scalar_t* x, scalar_t* y, const ChannelGeometry& geo,
                              ParamView<P, NP> pv) {
    using T = opmath_t<scalar_t>;
    if (geo.inner > 1 && geo.inner <= kSegment) {
      const bool stream = stream_forward_output(y, geo.N * geo.R * geo.C * geo.inner);
      const int64_t runs = geo.N * geo.R * geo.C;
      at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / geo.inner), [&](int64_t b, int64_t e) {
        run_chunk<RunsForwardLoop<OpT, scalar_t, P, NP>>(x, y, geo.inner, geo.C, geo.R * geo.C, pv,
                                                          b, e, stream);
      });
      return;
    }
    if (geo.inner > 1) {
      const bool stream = stream_forward_output(y, geo.N * geo.R * geo.C * geo.inner);
      for_each_segment(geo, [&](int64_t n, int64_t, int64_t c, int64_t, int64_t, int64_t off,
                                int64_t len) {
        T v[NP];
        pv.load(n, c, v);
        run_chunk<ForwardLoop<OpT<T>, scalar_t>>(x + off, y + off, len, OpT<T>::from(v), stream);
      });
      return;
    }
    const int64_t rows = geo.N * geo.R, C = geo.C;
    // One call per task, not per row: a row of 64 channels is 4 AVX-512 vectors, and the
    // per-row call cost more than its math (channels_last forward at 2^16: 2.7x NCHW's).
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
      run_chunk<ChannelsForwardLoop<OpT, scalar_t, P, NP>>(x, y, C, pv, geo.R, b, e);
    });
  }

  template <template <typename> class OpT, typename scalar_t, typename P, int NP>
  static std::array<at::Tensor, NP> channel_backward(const scalar_t* g, const scalar_t* x,
                                                     scalar_t* dx, const ChannelGeometry& geo,
                                                     ParamView<P, NP> pv,
                                                     const at::TensorOptions& options) {
    using T = opmath_t<scalar_t>;
    const int64_t N = geo.N, C = geo.C;
    const bool empty = geo.R * geo.inner == 0;
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
        run_chunk<RunsBackwardLoop<OpT, scalar_t, P, NP>>(g, x, dx, geo.inner, C, geo.R * C, pv, b, e,
                                                           &partial[b * NP]);
      });
    } else if (geo.inner > 1) {
      const int64_t segs = ceil_div(geo.inner, kSegment);
      K = geo.R * segs;
      partial.resize(N * K * C * NP);
      for_each_segment(geo, [&](int64_t n, int64_t r, int64_t c, int64_t s, int64_t segs_,
                                int64_t off, int64_t len) {
        T v[NP], sums[NP];
        pv.load(n, c, v);
        run_chunk<ReduceBackwardLoop<OpT<T>, scalar_t>>(g + off, x + off, dx + off, len,
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
          run_chunk<ChannelsBackwardLoop<OpT, scalar_t, P, NP>>(g + off, x + off, dx + off, C, pv, n,
                                                                r_end - r_begin, acc.data());
          for (int64_t c = 0; c < C; ++c)
            for (int j = 0; j < NP; ++j) partial[(t * C + c) * NP + j] = acc[j * C + c];
        }
      });
    }
    // Fixed-order finish: per channel, samples then slots.
    std::array<at::Tensor, NP> out;
    T* outp[NP];
    const auto acc_options = options.dtype(c10::CppTypeToScalarType<T>::value).device(at::kCPU);
    for (int j = 0; j < NP; ++j) {
      out[j] = at::empty({pv.n_stride[j] ? N * C : C}, acc_options);
      outp[j] = out[j].template data_ptr<T>();
    }
    at::parallel_for(0, C, 16, [&](int64_t b, int64_t e) {
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
};

}  // namespace
}  // namespace fusedact

FUSEDACT_REGISTER_BACKEND(CPU, fusedact::CpuBackend)
