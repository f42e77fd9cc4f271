// float16/bfloat16 <-> opmath in the CPU loops: per-lane conversions that the compiler
// vectorizes (load, to_scalar, store) and, on the AVX2 and AVX-512 targets, float16
// blocks converted with F16C (halves_to_floats, floats_to_halves).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../activation_math.h"
#include "cpu_isa.h"
#include "isa.h"

namespace fusedact {
namespace {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// float16 <-> float. On the AVX2 and AVX-512 targets the flat loops convert blocks with
// F16C (floats_to_halves, halves_to_floats); elsewhere, and for the few elements left
// over, these lane operations, which the compiler vectorizes: c10's
// fp16_ieee_to_fp32_value and fp16_ieee_from_fp32_value (exact one way, round to
// nearest even the other, as F16C's), on the bits read through a uint16_t pointer; a
// NaN keeps its sign and the top of its payload, as with vcvtps2ph (c10 writes 0x7E00).
// Not through c10::Half or _Float16, whose conversions GCC does not vectorize.
// Measurements: benchmarks/NOTES.md, "CPU float16 conversions".
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
// a quiet NaN: c10's conversion, bit for bit, but with a select where c10 branches (the
// branch keeps GCC from vectorizing the loops that also reduce).
// Measurements: benchmarks/NOTES.md, "CPU bfloat16 rounding".
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

#ifdef FUSEDACT_X86_PATHS
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
// bfloat16 at AVX2, n a multiple of 16, in the order two unpacks leave a 16: widened by
// vpunpck{l,h}wd under a zero low half (elements 0-3 8-11, then 4-7 12-15), rounded back
// as to_scalar rounds (nearest even, NaN 0x7FC0) and packed by vpackusdw, which restores
// the order: no cross-lane shuffle either way. For elementwise loops only (an element's
// place in dst is not its place in src).
FUSEDACT_TARGET_AVX2 inline void bf16_to_floats_interleaved(const c10::BFloat16* src, float* dst, int64_t n) {
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k = 0; k < n; k += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
    _mm256_store_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_unpacklo_epi16(zero, v));
    _mm256_store_si256(reinterpret_cast<__m256i*>(dst + k + 8), _mm256_unpackhi_epi16(zero, v));
  }
}
FUSEDACT_TARGET_AVX2 inline __m256i bf16_rounded_bits(__m256 v) {  // in the low 16 bits of each lane
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256 q = _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan);
  return _mm256_srli_epi32(_mm256_castps_si256(q), 16);
}
FUSEDACT_TARGET_AVX2 inline void floats_to_bf16_interleaved(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t k = 0; k < n; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                        _mm256_packus_epi32(bf16_rounded_bits(_mm256_load_ps(src + k)),
                                            bf16_rounded_bits(_mm256_load_ps(src + k + 8))));
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

}  // namespace
}  // namespace fusedact
