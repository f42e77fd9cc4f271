// How the CPU loops write their outputs: the store rule (when non-temporal stores pay,
// FUSEDACT_CPU_STORES and set_cpu_stores, the mincore check of the output's pages) and
// store_all, which computes an output block by block and stores or streams each block.
// Included by activations_cpu.cpp alone: it defines cpu_isa.h's store-mode functions.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../activation_math.h"
#include "cpu_isa.h"
#include "half_convert.h"
#include "isa.h"

namespace fusedact {

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

// Non-temporal stores go only into pages already in memory: an output mapped anew (glibc
// maps each allocation of 32 MiB or more afresh) is faulted in by the stores themselves,
// and cached stores win there. The middle and the last page of the n elements are asked
// (glibc writes its chunk header on the first).
// Measurements: benchmarks/NOTES.md, "CPU store rule: outputs mapped anew".
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
bool cpu_pages_in(const void* p, int64_t bytes) { return bytes <= 0 || pages_in(static_cast<const char*>(p), bytes); }

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

// ---- stores

// Large outputs go to memory with non-temporal stores when they could not stay in the
// last-level cache beside their inputs anyway: a normal store first reads the line it
// writes (read for ownership). Forward: output >= 24 MiB. Backward: g, x and dx
// >= 64 MiB together, and only for a memory-bound loop (hard_swish, kStreamBackward).
// Measurements: benchmarks/NOTES.md, "CPU store rule".
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
#endif

// dst[j] = f(i + j), rounded to scalar_t, for j < len (f gives opmath values). A
// float16/bfloat16 result is computed into an opmath buffer and rounded in a second
// loop: in the math's loop, GCC interleaves 16- and 32-bit lanes, which runs slower.
// Measurements: benchmarks/NOTES.md, "CPU rounding in a second loop".
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

// Elements every vector loop computes as one piece: a multiple of every vector width the
// compiler picks for the loops (16 floats, 8 doubles: one AVX-512 vector, two AVX2).
template <typename scalar_t>
constexpr int64_t kWhole = 64 / int64_t(sizeof(opmath_t<scalar_t>));

// n, or a pointer, hidden from the optimizer: a loop over a count it knows, or over a
// local buffer whose alignment and aliasing it knows, is compiled unlike the loop over
// the tensor (unrolled, other products fused into FMAs); hidden, it is compiled alike.
FUSEDACT_ALWAYS_INLINE int64_t opaque(int64_t n) {
  asm("" : "+r"(n));
  return n;
}
template <typename P>
FUSEDACT_ALWAYS_INLINE P* opaque(P* p) {
  asm volatile("" : "+r"(p)::"memory");
  return p;
}

// dst[0, 64) bytes = the n elements of `bytes` bytes each (n at most 64 / bytes) at src,
// zeros after, by masked vector loads and whole stores: scalar stores followed by the
// loop's vector load of them stalled (no store forwarding), 3.5x a 3x3 map's run.
#ifdef FUSEDACT_X86_PATHS
FUSEDACT_TARGET_AVX512 inline void load_padded_avx512(void* dst, const void* src, int64_t n, int bytes) {
  if (bytes == 4) {
    _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), src));
  } else if (bytes == 8) {
    _mm512_storeu_pd(dst, _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), src));
  } else {
    _mm512_storeu_si512(dst, _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t(1) << n) - 1), src));
  }
}
// AVX2 masks 32- and 64-bit elements only: 16-bit data as m / 2 pairs, and an odd last
// element blended in from a scalar load. A 32-byte half that crosses a page end is copied
// instead: AMD leaves faults on masked-out elements to the implementation, and Intel
// takes a slow assist for them.
FUSEDACT_TARGET_AVX2 inline void load_padded_avx2(void* dst, const void* src, int64_t n, int bytes) {
  for (int h = 0; h < 2; ++h) {  // 32-byte halves
    const int64_t per = 32 / bytes, m = std::clamp<int64_t>(n - h * per, 0, per);
    const uintptr_t at = reinterpret_cast<uintptr_t>(src) + h * 32;  // read below m only
    __m256i v = _mm256_setzero_si256();
    if (m > 0 && at % 4096 > 4096 - 32) {
      alignas(32) char part[32] = {};
      std::memcpy(part, reinterpret_cast<const void*>(at), m * bytes);
      v = _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
    } else if (m > 0 && bytes == 8) {
      const __m256i mask = _mm256_cmpgt_epi64(_mm256_set1_epi64x(m), _mm256_setr_epi64x(0, 1, 2, 3));
      v = _mm256_maskload_epi64(reinterpret_cast<const long long*>(at), mask);
    } else if (m > 0) {
      const int64_t pairs = bytes == 4 ? m : m / 2;
      const __m256i mask =
          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(pairs)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      v = _mm256_maskload_epi32(reinterpret_cast<const int*>(at), mask);
      if (bytes == 2 && m % 2) {
        uint16_t last;
        std::memcpy(&last, reinterpret_cast<const char*>(at) + 2 * (m - 1), 2);
        const __m256i at_last =
            _mm256_cmpeq_epi16(_mm256_set1_epi16(static_cast<short>(m - 1)),
                               _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        v = _mm256_blendv_epi8(v, _mm256_set1_epi16(static_cast<short>(last)), at_last);
      }
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<char*>(dst) + h * 32), v);
  }
}
#endif

// dst[0, kBytes) (a multiple of 64) = the n elements of `bytes` bytes each at src, zeros
// after: a short run's zero-padded copy, by the target's masked loads.
template <int kVector, int kBytes>
FUSEDACT_ALWAYS_INLINE void load_padded(void* dst, const void* src, int64_t n, int bytes) {
  for (int k = 0; k < kBytes / 64; ++k) {
    const int64_t per = 64 / bytes, m = std::clamp<int64_t>(n - k * per, 0, per);
    void* d = static_cast<char*>(dst) + 64 * k;
    const void* s = reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(src) + 64 * k);
#ifdef FUSEDACT_X86_PATHS
    if constexpr (kVector == 64) {
      load_padded_avx512(d, s, m, bytes);
      continue;
    } else if constexpr (kVector == 32) {
      load_padded_avx2(d, s, m, bytes);
      continue;
    }
#endif
    std::memset(d, 0, 64);
    std::memcpy(d, s, m * bytes);
  }
}

// out[i] = f(i) for i < n, the half types in blocks of kBlockBytes of output, float and
// double in one loop (in blocks, the compiler checks for aliasing in every block). With
// kVector and `stream`, blocks computed into an aligned buffer are written with
// non-temporal 32-byte stores.
// With kVector, kPure (f only reads; out is not its input) and n >= kWhole, no element
// takes the scalar epilogue the compiler adds to a vector loop: the rest after the blocks
// goes in whole vectors of kWhole, the last one ending at n (its elements also in the
// one before are computed again, the same values), and the head before the streamed
// blocks as the kWhole that start with it. Fewer than kWhole elements the caller pads
// (ForwardLoop, BackwardLoop: run_padded). GCC compiles that epilogue unlike the vector
// code (it keeps the branches and fuses other products into FMAs): ACON-C's forward and
// mish's dx at AVX-512 float32 differed in the last bit with an element's place.
// Tests: test_cpu_values_do_not_depend_on_the_code_path.
// Measurements: benchmarks/NOTES.md, "CPU float and double in one loop" and "Every
// element through the vector loop".
template <bool kVector, typename scalar_t, typename F, bool kPure = true>
FUSEDACT_ALWAYS_INLINE void store_all(scalar_t* out, int64_t n, bool stream, F f) {
  constexpr int64_t kBlock = kBlockBytes / sizeof(scalar_t);
  constexpr int64_t kW = kWhole<scalar_t>;
  const bool pieces = kVector && kPure && n >= kW;
  int64_t i = 0;
#ifdef FUSEDACT_X86_PATHS
  if constexpr (kVector) {
    if (stream) {
      const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % 32);
      const int64_t head =
          misalign % sizeof(scalar_t) ? n : std::min(n, ((32 - misalign) % 32) / int64_t(sizeof(scalar_t)));
      if (pieces && head < kW) {
        if (head > 0) compute_block<kW, kVector>(out, 0, kW, f);  // [0, kW): past the head, again
      } else {
        compute_block<0, kVector>(out, 0, head, f);
      }
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
  if (pieces && std::is_same_v<scalar_t, opmath_t<scalar_t>>) {
    // blocks of kW, the last one ending at n (over some of the one before, again)
    for (int64_t b = i; b < n; b += kW) {
      const int64_t s = std::min(b, n - kW);
      compute_block<kW, kVector>(out + s, s, kW, f);
    }
  } else if (pieces) {  // 16-bit: rounded a block at a time, kW alone measured slower
    const int64_t m = (n - i) - (n - i) % kW;
    compute_block<0, kVector>(out + i, i, m, f);
    if (i + m < n) compute_block<kW, kVector>(out + n - kW, n - kW, kW, f);
  } else {
    compute_block<0, kVector>(out + i, i, n - i, f);
  }
}

}  // namespace
}  // namespace fusedact
