// Argument checks shared by every backend; each message names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace fusedact {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), " but x has shape ", x.sizes());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but x has dtype ",
              x.scalar_type());
}

// A parameter is x's dtype, or float32 beside a float16/bfloat16 x (autocast keeps
// parameters in float32; docs/SPEC.md, mixed precision).
inline void check_param_dtype(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x) {
  check_floating(op, name, p);
  const bool half_x = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || (half_x && p.scalar_type() == at::kFloat), op, ": ", name,
              " has dtype ", p.scalar_type(), " but x has dtype ", x.scalar_type(),
              "; parameters must have x's dtype, or float32 when x is "
              "float16 or bfloat16");
}

// The gradient arrives with x's shape, dtype and device.
inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  check_same_device(op, "grad", grad, x);
  check_same_shape(op, "grad", grad, x);
  check_same_dtype(op, "grad", grad, x);
}

// A Python-float beta is computed in x's opmath, float32 but for float64 x: one that
// float32 cannot hold (|beta| >= 2^128 - 2^103 rounds to inf) would give NaN in dx, and
// in y at x = 0. Python's checks (fusedact/checks.py) say the same.
constexpr double kFloat32Overflow = 0x1.ffffffp+127;  // the smallest double float32 rounds to inf

inline void check_float_beta(const char* op, const at::Tensor& x, double beta) {
  if (x.scalar_type() == at::kDouble || !std::isfinite(beta)) return;
  TORCH_CHECK(std::fabs(beta) < kFloat32Overflow, op, ": beta = ", beta,
              " is outside float32's range, in which the kernels compute for ", x.scalar_type(),
              " x (it would round to inf and give NaN); use a smaller beta or float64 x");
}

}  // namespace fusedact
