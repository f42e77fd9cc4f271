// The one place the math lives (docs/SPEC.md). Per-element forward and backward of every
// activation, templated on the compute type T (float for float/half/bfloat16 inputs,
// double for double), used unchanged by the CPU loops and the CUDA kernels.
//
// Every op is a small struct holding its (already converted) parameters, with
//   T forward(T x)                           y
//   T backward(T g, T x)                     dx = g * dy/dx
//   T backward(T g, T x, T (&dp)[kParams])   dx, and dp[j] = g * dy/dparam_j
// kParams is the number of parameters that get a gradient by reduction; an op with
// parameters is built per channel by Op::from(values).
//
// forward and the two-argument backward take how exp and division are computed, M:
// Precise (the default: every CPU loop, and float32/float64 everywhere) or Lowp (the
// GPU's one-instruction approximations, for float16/bfloat16 data, whose one rounding
// to 8 or 11 bits hides their few float32 ulp: tests/test_lowp.py proves every half
// value within SPEC's 2 ulp on a model of their documented error). The backward with
// parameter gradients takes at most LowpRcp (the reciprocal alone): its float32 sums
// keep float32's accuracy.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDACT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDACT_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace fusedact {
namespace math {

FUSEDACT_HOST_DEVICE float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

FUSEDACT_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// exp in float, about 1 ulp, written with plain arithmetic so that the compiler
// vectorizes it on the CPU (libm's expf is a scalar call) and the GPU computes the
// same function. Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, the Cephes expf
// polynomial for e^r, and the scale 2^k applied as 2 * 2^(k-1), whose factor 2 is
// folded into the polynomial (exact): 2^(k-1) is then a normal float for every k
// used, built with one shift. Results below e^-86.9 (1.9e-38, under float's normal
// range) flush to 0, as docs/SPEC.md allows below ~1e-33; above FLT_MAX the last product
// overflows to +inf.
namespace detail {
constexpr float kExpLow = -86.9f;  // k >= -125, so k - 1 >= -126

// e^xc for kExpLow <= xc <= 88.8 (NaN gives NaN); anything, possibly NaN, below.
FUSEDACT_HOST_DEVICE float exp_reduced(float xc) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float v = xc * 1.44269504088896341f + shifter;
  const float kf = v - shifter;
  float r = xc - kf * 0.693145751953125f;  // ln2 high part, exact in kf * hi
  r = r - kf * 1.428606765330187045e-06f;  // ln2 low part
  // 2 e^r = 2 + 2r + r^2 (2 p(r)), p the Cephes polynomial
  float p = 3.9751383000e-4f;
  p = p * r + 2.7963999014e-3f;
  p = p * r + 1.6666903815e-2f;
  p = p * r + 8.3331591788e-2f;
  p = p * r + 3.3333330918e-1f;
  p = p * r + 1.0000000240e+0f;
  const float two_er = (p * r) * r + (r + r) + 2.0f;
  // 2^(k-1): the low bits of v hold k + 0x400000 (v = 1.5 * 2^23 + k)
  const uint32_t k_minus_1 = float_to_bits(v) - float_to_bits(shifter) - 1u;
  const float scale = bits_to_float((k_minus_1 + 127u) << 23);
  return two_er * scale;
}
}  // namespace detail

FUSEDACT_HOST_DEVICE float exp_(float x) {
  // Comparisons are false for NaN, so NaN reaches the polynomial and comes out NaN.
  // Below kExpLow the result is replaced by 0, whatever the polynomial made of x (the
  // scale's exponent wraps there), so only the top needs a clamp.
  const float xc = x > 88.8f ? 88.8f : x;  // e^88.8 > FLT_MAX, k <= 128
  const float e = detail::exp_reduced(xc);
  return x < detail::kExpLow ? 0.0f : e;
}

// exp_ for x <= 0 (or NaN): the same values, without the clamp against overflow, which
// slows the sigmoid's backward loops.
// Measurements: benchmarks/NOTES.md, "exp without the clamp".
FUSEDACT_HOST_DEVICE float exp_nonpositive(float x) {
  const float e = detail::exp_reduced(x);
  return x < detail::kExpLow ? 0.0f : e;
}

FUSEDACT_HOST_DEVICE double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

FUSEDACT_HOST_DEVICE double exp_nonpositive(double x) { return exp_(x); }

// a b + c rounded once, where a sum of two products leaves the compiler to choose which
// it fuses: GCC chose by the loop the math was inlined in.
FUSEDACT_HOST_DEVICE double fma_(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// ---- how exp and division are computed (the M of forward<M> and backward<M>)

// exp_ and IEEE division: about 1 ulp each, the same on the CPU and the GPU.
struct Precise {
  template <typename T>
  static FUSEDACT_HOST_DEVICE T exp(T x) {
    return exp_(x);
  }
  template <typename T>
  static FUSEDACT_HOST_DEVICE T exp_nonpositive(T x) {
    return math::exp_nonpositive(x);
  }
  template <typename T>
  static FUSEDACT_HOST_DEVICE T rcp(T b) {
    return T(1) / b;
  }
  template <typename T>
  static FUSEDACT_HOST_DEVICE T div(T a, T b) {
    return a / b;
  }
};

// The host's stand-in for the GPU's approximations, used only by the model check
// (tests/cpp/lowp_sim.cpp, which defines FUSEDACT_LOWP_MODEL and sets the errors):
// the exact value times (1 + error), flushed to zero below float's normal range as the
// .ftz instructions do.
namespace lowp_model {
#if defined(FUSEDACT_LOWP_MODEL)
extern double ex2_error, rcp_error;
#else
constexpr double ex2_error = 0.0, rcp_error = 0.0;
#endif
inline float flush(float v) { return std::fabs(v) < FLT_MIN ? std::copysign(0.0f, v) : v; }
inline float ex2(float t) {
  if (t != t) return t;
  return flush(static_cast<float>(std::exp2(static_cast<double>(t)) * (1.0 + ex2_error)));
}
inline float rcp(float b) {
  if (b != b) return b;
  return flush(static_cast<float>(1.0 / static_cast<double>(flush(b)) * (1.0 + rcp_error)));
}
}  // namespace lowp_model

// a / b's reciprocal alone as rcp.approx.ftz(b) (one MUFU.RCP, about 1 ulp, for an IEEE
// division's ~10 instructions and its slow-path call); exp stays Precise. For the GPU's
// float16/bfloat16 backward that sums parameter gradients: a term's error grows by about
// 1 float32 ulp, inside the 8 ulp a term the sums' tolerance allows (tests/test_lowp.py).
// float only: double keeps Precise.
struct LowpRcp : Precise {
  using Precise::rcp;  // double (and anything but float)

  static FUSEDACT_HOST_DEVICE float rcp(float b) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(b));
    return y;
#else
    return lowp_model::rcp(b);
#endif
  }
};

// For float16/bfloat16 data on the GPU: e^x as ex2.approx.ftz(x log2 e) (one MUFU.EX2
// after a multiply, for exp_'s ~15 instructions; relative error about 2 float32 ulp
// plus |x| log2(e) ulp from rounding the product) and a / b as a * rcp.approx.ftz(b)
// (LowpRcp's reciprocal). Results below float's normal range (1.2e-38) flush to 0,
// inside SPEC's 1e-33. float only: double keeps Precise.
struct Lowp : LowpRcp {
  using LowpRcp::rcp;
  using Precise::div;  // double (and anything but float) takes Precise's templates
  using Precise::exp;
  using Precise::exp_nonpositive;

  static FUSEDACT_HOST_DEVICE float exp(float x) {
    const float t = x * 1.44269504088896341f;
#if defined(__CUDA_ARCH__)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(t));
    return y;
#else
    return lowp_model::ex2(t);
#endif
  }
  static FUSEDACT_HOST_DEVICE float exp_nonpositive(float x) { return exp(x); }
  static FUSEDACT_HOST_DEVICE float div(float a, float b) { return a * rcp(b); }
};

template <typename T>
FUSEDACT_HOST_DEVICE T abs_(T x) {
#if defined(__CUDA_ARCH__)
  return fabs(x);
#else
  return std::fabs(x);
#endif
}

template <class M = Precise, typename T>
FUSEDACT_HOST_DEVICE T sigmoid(T z) {
  return M::rcp(T(1) + M::exp(-z));
}

// s(z) and its complement sc = 1 - s(z). Where s is near 1, 1 - s cancels (eager's
// s * (1 - s) loses all digits as z grows); here both come from a = e^-|z|, which never
// overflows: s(|z|) = 1 / (1 + a) and 1 - s(|z|) = a s(|z|), swapped for z < 0.
template <class M = Precise, typename T>
FUSEDACT_HOST_DEVICE void sigmoid_pair(T z, T& s, T& sc) {
  const T a = M::exp_nonpositive(-abs_(z));
  const T r = M::rcp(T(1) + a);
  const T ar = a * r;
  const bool pos = z >= T(0);
  s = pos ? r : ar;
  sc = pos ? ar : r;
}

// s(z) and its slope ds = s (1 - s), which is s(|z|) (1 - s(|z|)) for either sign of z:
// one select fewer than sigmoid_pair.
template <class M = Precise, typename T>
FUSEDACT_HOST_DEVICE void sigmoid_slope(T z, T& s, T& ds) {
  const T a = M::exp_nonpositive(-abs_(z));
  const T r = M::rcp(T(1) + a);
  const T ar = a * r;
  s = z >= T(0) ? r : ar;
  ds = r * ar;
}

// Beyond |z| = value, s(z) and 1 - s(z) are exactly 0 or 1 in T. Products such as
// z (1 - s) take z clamped there, so that they keep their true value 0 when z itself
// is huge or overflowed to inf (x near the float maximum): inf * 0 would be NaN.
template <typename T> struct SigmoidSaturation;
template <> struct SigmoidSaturation<float> { static constexpr float value = 128.0f; };
template <> struct SigmoidSaturation<double> { static constexpr double value = 1024.0; };

template <typename T>
FUSEDACT_HOST_DEVICE T clamp_saturated(T z) {
  const T k = SigmoidSaturation<T>::value;
  return z > k ? k : (z < -k ? -k : z);
}

// v^2 s (1 - s) as (v s)(v (1 - s)): 0 where the sigmoid saturates, even where v^2
// overflows (v = 1e20 in float); NaN stays NaN.
template <typename T>
FUSEDACT_HOST_DEVICE T square_times_ds(T v, T z, T s, T sc) {
  const T k = SigmoidSaturation<T>::value;
  return (z >= k || z <= -k) ? T(0) : (v * s) * (v * sc);
}

// Above this x, tanh(softplus(x)) rounds to 1 in T and e^2x would be needlessly
// large (it overflows float from x = 44.4).
template <typename T> struct MishThreshold;
template <> struct MishThreshold<float> { static constexpr float value = 20.0f; };
template <> struct MishThreshold<double> { static constexpr double value = 40.0; };

// swish (Swish-beta, SiLU at beta = 1)
//   y = x s(beta x),  dy/dx = s + beta x s (1 - s),  dy/dbeta = x^2 s (1 - s)
// The products are grouped as beta (x ds) and x (x ds), ds = s (1 - s) <= 1/4: x ds is
// bounded by |x| and is 0, not inf * 0, where the sigmoid saturates, with no clamp (NaN
// at x = +-inf, as torch's silu backward).
template <typename T>
struct Swish {
  static constexpr int kParams = 1;
  T beta;

  static FUSEDACT_HOST_DEVICE Swish from(const T* v) { return {v[0]}; }
  // x / (1 + e^-beta x): one rounding and one operation fewer than x * s.
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T forward(T x) const {
    return M::div(x, T(1) + M::exp(-(beta * x)));
  }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T g, T x) const {
    T s, ds;
    sigmoid_slope<M>(beta * x, s, ds);
    return g * (s + beta * (x * ds));
  }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T g, T x, T (&dp)[kParams]) const {
    T s, ds;
    sigmoid_slope<M>(beta * x, s, ds);
    const T xds = x * ds;
    dp[0] = g * (x * xds);
    return g * (s + beta * xds);
  }
};

// SiLU, swish at beta = 1 (F.silu, YOLOv5's default)
//   y = x s(x),  dy/dx = s + x s (1 - s)
// The same values as Swish{1}, bit for bit (the multiplications by beta are exact
// there), without those multiplications.
template <typename T>
struct Silu {
  static constexpr int kParams = 0;

  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T forward(T x) const {
    return M::div(x, T(1) + M::exp(-x));
  }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T g, T x) const {
    T s, ds;
    sigmoid_slope<M>(x, s, ds);
    return g * (s + x * ds);
  }
};

// mish: y = x t, t = tanh(softplus(x)) = n / (n + 2) with e = e^x, n = e (e + 2);
//   dy/dx = t + x (1 - t^2) s(x), and 1 - t^2 = 2 (q + n) / q^2 with q = n + 2
//   (no cancellation as t -> 1); s(x) = e / (1 + e).
// The backward takes one division, r = 1 / ((1 + e) q), for its three quotients:
// 1 / q = (1 + e) r and 1 / (1 + e) = q r. An IEEE division is about ten instructions
// (SASS report), the products two roundings each: a few float32 ulp, far inside one
// float16/bfloat16 rounding (tests/test_numerics.py checks every half value). (1 + e) q
// is at most about e^3 < 1.2e26 below the threshold (x < 20), so it cannot overflow.
template <typename T>
struct Mish {
  static constexpr int kParams = 0;

  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T forward(T x) const {
    const bool big = x >= MishThreshold<T>::value;
    const T e = M::exp(big ? T(0) : x);
    const T n = e * (e + T(2));
    const T t = big ? T(1) : M::div(n, n + T(2));
    return x * t;
  }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T g, T x) const {
    const bool big = x >= MishThreshold<T>::value;
    const T e = M::exp(big ? T(0) : x);
    const T n = e * (e + T(2));
    const T q = n + T(2);
    const T p = T(1) + e;
    const T r = M::rcp(p * q);
    const T inv_q = p * r;
    const T t = big ? T(1) : n * inv_q;
    const T one_minus_t2 = big ? T(0) : (T(2) * (q + n) * inv_q) * inv_q;
    const T s = e * (q * r);
    const T m = x * one_minus_t2 * s;
    // double: t's product fused, as GCC did in NCHW runs (it fused m's in channels_last
    // rows, 1 ulp of the sum apart). Its loops call exp, so they are scalar code anyway.
    if constexpr (std::is_same_v<T, double>) return g * (big ? T(1) + m : fma_(n, inv_q, m));
    return g * (t + m);
  }
};

// hard_swish: y = 0 (x <= -3), x (x + 3) / 6 (-3 < x < 3), x (x >= 3: x itself, so
// no overflow of x * 6); dy/dx = 0, x / 3 + 1/2, 1: PyTorch's convention at the kinks.
// The zero is -0.0, the sign eager's x * 0 / 6 gives for every finite x <= -3.
template <typename T>
struct HardSwish {
  static constexpr int kParams = 0;

  // No exp and divisions by constants only: M changes nothing.
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T forward(T x) const {
    const T inner = x * (x + T(3)) / T(6);
    const T y = x >= T(3) ? x : inner;
    return x <= T(-3) ? T(-0.0) : y;
  }
  // Both directions select between values computed for every lane: written as nested
  // selects, GCC turns each use of g into a masked load.
  // Measurements: benchmarks/NOTES.md, "hard_swish as two selects".
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T g, T x) const {
    const T inner = g * (x / T(3) + T(0.5));
    const T dx = x >= T(3) ? g : inner;
    return x <= T(-3) ? T(0) : dx;
  }
};

// acon_c: d = p1 - p2, u = d x, s = s(beta u), y = u s + p2 x;
//   h = s (1 + beta u (1 - s)),  dy/dx = d h + p2,  dy/dp1 = x h,
//   dy/dp2 = x (1 - h),  dy/dbeta = u^2 s (1 - s).
// 1 - h is computed as (1 - s)(1 - beta u s), which does not cancel as h -> 1, and y as
// x (d s + p2), finite wherever the result is, though u = d x may overflow.
template <typename T>
struct AconC {
  static constexpr int kParams = 3;  // p1, p2, beta
  T p1, p2, beta;

  static FUSEDACT_HOST_DEVICE AconC from(const T* v) { return {v[0], v[1], v[2]}; }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T forward(T x) const {
    const T d = p1 - p2;
    return x * (d * sigmoid<M>(beta * (d * x)) + p2);
  }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T g, T x, T (&dp)[kParams]) const {
    const T d = p1 - p2;
    const T u = d * x;
    const T z = beta * u;
    T s, sc;
    sigmoid_pair<M>(z, s, sc);
    const T zc = clamp_saturated(z);
    const T h = s * (T(1) + zc * sc);
    const T gx = g * x;
    dp[0] = gx * h;
    dp[1] = gx * (sc * (T(1) - zc * s));
    dp[2] = g * square_times_ds(u, z, s, sc);
    return g * (d * h + p2);
  }
};

// identity: y = x; batch_norm_act's act="identity" (a plain BatchNorm).
template <typename T>
struct Identity {
  static constexpr int kParams = 0;

  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T forward(T x) const {
    return x;
  }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T g, T) const {
    return g;
  }
};

// BatchNorm's normalization and affine as an activation's prologue (batch_norm_act):
//   z = (x - mean) a + b (a = weight * invstd), y = act(z), dz = g act'(z).
// Parameters: mean, a, b, then the activation's. The backward returns dz (not dx: dx
// needs the sums, BnDx below) and sums dz (x - mean) and dz (dweight / invstd, dbias);
// slot 2 is unused (zero), the activation's parameter gradients follow.
template <template <typename> class Act>
struct BnAct {
  template <typename T>
  struct Op {
    static constexpr int kAct = Act<T>::kParams;
    static constexpr int kParams = 3 + kAct;
    T mean, a, b;
    Act<T> act;

    static FUSEDACT_HOST_DEVICE Op from(const T* v) {
      if constexpr (kAct == 0) {
        return {v[0], v[1], v[2], Act<T>{}};
      } else {
        return {v[0], v[1], v[2], Act<T>::from(v + 3)};
      }
    }
    template <class M = Precise>
    FUSEDACT_HOST_DEVICE T forward(T x) const {
      return act.template forward<M>((x - mean) * a + b);
    }
    template <class M = Precise>
    FUSEDACT_HOST_DEVICE T backward(T g, T x, T (&dp)[kParams]) const {
      const T xm = x - mean;
      const T z = xm * a + b;
      T dz;
      if constexpr (kAct == 0) {
        dz = act.template backward<M>(g, z);
      } else {
        T da[kAct];
        dz = act.template backward<M>(g, z, da);
        for (int j = 0; j < kAct; ++j) dp[3 + j] = da[j];
      }
      dp[0] = dz * xm;
      dp[1] = dz;
      dp[2] = T(0);
      return dz;
    }
  };
};

// BatchNorm's dx from dz (BnAct's backward): dx = k1 dz + k2 (x - mean) + c per channel;
// training: k1 = a, k2 = -a invstd^2 sum(dz (x - mean)) / M, c = -a sum(dz) / M;
// inference: k1 = a, k2 = c = 0. Its slots sum nothing (zeros; kNoSums).
template <typename T>
struct BnDx {
  static constexpr int kParams = 4;  // k1, k2, mean, c
  static constexpr bool kNoSums = true;
  T k1, k2, mean, c;

  static FUSEDACT_HOST_DEVICE BnDx from(const T* v) { return {v[0], v[1], v[2], v[3]}; }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T forward(T x) const {
    return x;
  }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T dz, T x, T (&dp)[kParams]) const {
    dp[0] = dp[1] = dp[2] = dp[3] = T(0);
    return k1 * dz + (k2 * (x - mean) + c);
  }
};

// BnDx's k2 and c from the backward's sums over the M elements of a channel (zero in
// inference), in the Python composition's order of roundings: the one form every pass
// that builds them uses (their results are bitwise the same).
template <typename T>
FUSEDACT_HOST_DEVICE void bn_dx_coefficients(T a, T invstd, T s_xm, T s_dz, T M, bool training, T& k2, T& c) {
  k2 = training ? -a * invstd * invstd * s_xm / M : T(0);
  c = training ? -a * s_dz / M : T(0);
}

// Whether a backward pass writes Op's result: not for an op that only sums (kSumsOnly).
template <class Op, class = void>
struct SumsOnly : std::false_type {};
template <class Op>
struct SumsOnly<Op, std::void_t<decltype(Op::kSumsOnly)>> : std::true_type {};
template <class Op>
constexpr bool kWrites = !SumsOnly<Op>::value;

// Whether a backward pass sums Op's parameter terms: not for an op whose slots are all
// zero (kNoSums: BatchNorm's dx passes), whose loops then skip the accumulators.
template <class Op, class = void>
struct NoSums : std::false_type {};
template <class Op>
struct NoSums<Op, std::void_t<decltype(Op::kNoSums)>> : std::true_type {};
template <class Op>
constexpr bool kSums = !NoSums<Op>::value;

// BnAct's backward for its sums alone: the loops skip the dz store (kSumsOnly), and the
// dx pass (BnActDx) recomputes dz from g and x, so that dz is never written and read back.
template <template <typename> class Act>
struct BnActSums {
  template <typename T>
  struct Op : BnAct<Act>::template Op<T> {
    static constexpr bool kSumsOnly = true;
    static FUSEDACT_HOST_DEVICE Op from(const T* v) { return {BnAct<Act>::template Op<T>::from(v)}; }
  };
};

// A channel's moments about a shift, for the GPU's batch statistics (ops_impl.h's
// bn_moments, twice from fusedact/batch_norm.py's _moment_stats): sums d = x - shift and
// d^2, writes nothing. Parameters: the shift,
// then an unused slot (ParamView loads one value a slot; the two sums need two slots).
template <typename T>
struct BnMoments {
  static constexpr int kParams = 2;
  static constexpr bool kSumsOnly = true;
  T shift, unused;

  static FUSEDACT_HOST_DEVICE BnMoments from(const T* v) { return {v[0], v[1]}; }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T forward(T x) const {
    return x;
  }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T, T x, T (&dp)[kParams]) const {
    const T d = x - shift;
    dp[0] = d;
    dp[1] = d * d;
    return T(0);
  }
};

// The CPU statistics' first pass (the mean's): sums x - zero (zero is 0; x - 0 is x,
// bitwise), as BnMoments with shift 0 sums d, without the squares it would throw away.
template <typename T>
struct BnMean {
  static constexpr int kParams = 1;
  static constexpr bool kSumsOnly = true;
  T zero;

  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T forward(T x) const {
    return x;
  }
  template <class M = Precise>
  FUSEDACT_HOST_DEVICE T backward(T, T x, T (&dp)[kParams]) const {
    dp[0] = x - zero;
    return T(0);
  }
};

// BatchNorm's dx from g and x: dz = g act'(z) recomputed, then BnDx's dx = a dz + k2 (x -
// mean) + c. Parameters: k2, c, then BnAct's (mean, a, b, the activation's): first, so
// that NP scalars in order brace-initialize it (an activation without members is last).
// Its slots sum nothing (zeros; kNoSums).
template <template <typename> class Act>
struct BnActDx {
  template <typename T>
  struct Op {
    using Bn = typename BnAct<Act>::template Op<T>;
    static constexpr int kParams = Bn::kParams + 2;
    static constexpr bool kNoSums = true;
    T k2, c;
    Bn bn;

    static FUSEDACT_HOST_DEVICE Op from(const T* v) { return {v[0], v[1], Bn::from(v + 2)}; }
    template <class M = Precise>
    FUSEDACT_HOST_DEVICE T forward(T x) const {
      return x;
    }
    template <class M = Precise>
    FUSEDACT_HOST_DEVICE T backward(T g, T x, T (&dp)[kParams]) const {
      const T xm = x - bn.mean;
      const T z = xm * bn.a + bn.b;
      T dz;
      if constexpr (Bn::kAct == 0) {
        dz = bn.act.template backward<M>(g, z);
      } else {
        T da[Bn::kAct];
        dz = bn.act.template backward<M>(g, z, da);
      }
      for (int j = 0; j < kParams; ++j) dp[j] = T(0);
      return bn.a * dz + (k2 * xm + c);
    }
  };
};

}  // namespace math
}  // namespace fusedact
