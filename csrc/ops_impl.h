// The op implementations every backend shares: argument checks, layout, dtype
// dispatch and output allocation. A backend B supplies the four kernel entry points
//   B::forward<Op>(x, y, n, op)                  y = op.forward(x), flat
//   B::backward<Op>(g, x, dx, n, op)             dx = op.backward(g, x), flat
//   B::channel_forward<OpT>(x, y, geo, params)   per-channel parameters
//   B::channel_backward<OpT>(g, x, dx, geo, params, options)
//       -> the parameter gradients, summed deterministically, in the opmath type
// and each backend file registers these functions for its dispatch key.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "activation_math.h"
#include "channel_layout.h"
#include "checks.h"

namespace fusedact {

// Calls f(P{}) with P the C++ type of the parameters: scalar_t, or float beside a
// float16/bfloat16 x (the dtype checks have run).
template <typename scalar_t, typename F>
void with_param_type(at::ScalarType p, F&& f) {
  if (p == c10::CppTypeToScalarType<scalar_t>::value)
    f(scalar_t{});
  else
    f(float{});
}

#define FUSEDACT_DISPATCH(TYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, "fusedact", __VA_ARGS__)

// Forward of an activation without learnable parameters.
template <class B, template <typename> class OpT, typename MakeOp>
at::Tensor unary_forward(const char* name, const at::Tensor& x_in, MakeOp make_op) {
  check_floating(name, "x", x_in);
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  FUSEDACT_DISPATCH(x.scalar_type(), [&] {
    using T = at::opmath_type<scalar_t>;
    B::template forward<OpT<T>>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(),
                                make_op(T{}));
  });
  return y;
}

template <class B, template <typename> class OpT, typename MakeOp>
at::Tensor unary_backward(const char* name, const at::Tensor& grad, const at::Tensor& x_in,
                          MakeOp make_op) {
  check_floating(name, "x", x_in);
  check_grad(name, grad, x_in);
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor g = with_layout_of(grad, x);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  FUSEDACT_DISPATCH(x.scalar_type(), [&] {
    using T = at::opmath_type<scalar_t>;
    B::template backward<OpT<T>>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                 dx.data_ptr<scalar_t>(), x.numel(), make_op(T{}));
  });
  return dx;
}

// The parameter gradient from its opmath sums: the parameter's dtype and shape.
inline at::Tensor as_param_grad(const at::Tensor& sums, const at::Tensor& param) {
  return sums.to(param.scalar_type()).view(param.sizes());
}

// ---- swish: beta a Python float, or a one-element tensor (learnable; read on the
// device, never synchronised to the host).

inline void check_swish_beta(const char* name, const at::Tensor& x, const at::Tensor& b) {
  check_same_device(name, "beta", b, x);
  check_param_dtype(name, "beta", b, x);
  TORCH_CHECK(b.numel() == 1, name, ": beta must be a float or a tensor with one element, "
              "got shape ", b.sizes());
}

template <class B>
at::Tensor swish_forward(const at::Tensor& x, double beta,
                         const c10::optional<at::Tensor>& beta_tensor) {
  constexpr const char* name = "fusedact.swish";
  if (!beta_tensor.has_value()) check_float_beta(name, x, beta);
  if (!beta_tensor.has_value() && beta == 1.0)
    return unary_forward<B, math::Silu>(name, x, [](auto t) { return math::Silu<decltype(t)>{}; });
  if (!beta_tensor.has_value())
    return unary_forward<B, math::Swish>(name, x, [&](auto t) {
      return math::Swish<decltype(t)>{static_cast<decltype(t)>(beta)};
    });
  check_floating(name, "x", x);
  check_swish_beta(name, x, *beta_tensor);
  c10::DeviceGuard guard(x.device());
  const at::Tensor xd = dense(x);
  const at::Tensor b = beta_tensor->contiguous();
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() == 0) return y;
  FUSEDACT_DISPATCH(xd.scalar_type(), [&] {
    with_param_type<scalar_t>(b.scalar_type(), [&](auto p_tag) {
      using P = decltype(p_tag);
      ParamView<P, 1> pv{{b.data_ptr<P>()}, {0}};
      B::template channel_forward<math::Swish>(xd.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                               flat_geometry(xd), pv);
    });
  });
  return y;
}

// Returns (dx, dbeta); dbeta has beta_tensor's shape and dtype, or is empty when beta
// was a Python float.
template <class B>
std::tuple<at::Tensor, at::Tensor> swish_backward(const at::Tensor& grad, const at::Tensor& x,
                                                  double beta,
                                                  const c10::optional<at::Tensor>& beta_tensor) {
  constexpr const char* name = "fusedact.swish_backward";
  if (!beta_tensor.has_value()) {
    check_float_beta(name, x, beta);
    at::Tensor dx = beta == 1.0
        ? unary_backward<B, math::Silu>(name, grad, x, [](auto t) { return math::Silu<decltype(t)>{}; })
        : unary_backward<B, math::Swish>(name, grad, x, [&](auto t) {
            return math::Swish<decltype(t)>{static_cast<decltype(t)>(beta)};
          });
    return {dx, at::empty({0}, x.options())};
  }
  check_floating(name, "x", x);
  check_grad(name, grad, x);
  check_swish_beta(name, x, *beta_tensor);
  c10::DeviceGuard guard(x.device());
  const at::Tensor xd = dense(x);
  const at::Tensor g = with_layout_of(grad, xd);
  const at::Tensor b = beta_tensor->contiguous();
  at::Tensor dx = at::empty_like(xd);
  at::Tensor dbeta;
  FUSEDACT_DISPATCH(xd.scalar_type(), [&] {
    with_param_type<scalar_t>(b.scalar_type(), [&](auto p_tag) {
      using P = decltype(p_tag);
      ParamView<P, 1> pv{{b.data_ptr<P>()}, {0}};
      auto sums = B::template channel_backward<math::Swish>(
          g.data_ptr<scalar_t>(), xd.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
          flat_geometry(xd), pv, xd.options());
      dbeta = as_param_grad(sums[0], *beta_tensor);
    });
  });
  return {dx, dbeta};
}

// ---- mish, hard_swish

template <class B>
at::Tensor mish_forward(const at::Tensor& x) {
  return unary_forward<B, math::Mish>("fusedact.mish", x,
                                      [](auto t) { return math::Mish<decltype(t)>{}; });
}

template <class B>
at::Tensor mish_backward(const at::Tensor& grad, const at::Tensor& x) {
  return unary_backward<B, math::Mish>("fusedact.mish_backward", grad, x,
                                       [](auto t) { return math::Mish<decltype(t)>{}; });
}

template <class B>
at::Tensor hard_swish_forward(const at::Tensor& x) {
  return unary_forward<B, math::HardSwish>(
      "fusedact.hard_swish", x, [](auto t) { return math::HardSwish<decltype(t)>{}; });
}

template <class B>
at::Tensor hard_swish_backward(const at::Tensor& grad, const at::Tensor& x) {
  return unary_backward<B, math::HardSwish>(
      "fusedact.hard_swish_backward", grad, x,
      [](auto t) { return math::HardSwish<decltype(t)>{}; });
}

// ---- acon_c

template <class B>
at::Tensor acon_c_forward(const at::Tensor& x, const at::Tensor& p1, const at::Tensor& p2,
                          const at::Tensor& beta, int64_t channel_dim) {
  const AconArgs a = acon_args("fusedact.acon_c", x, p1, p2, beta, channel_dim);
  c10::DeviceGuard guard(x.device());
  at::Tensor y = at::empty_like(a.x);
  if (a.x.numel() == 0) return y;
  FUSEDACT_DISPATCH(a.x.scalar_type(), [&] {
    with_param_type<scalar_t>(a.param[0].scalar_type(), [&](auto p_tag) {
      using P = decltype(p_tag);
      B::template channel_forward<math::AconC>(a.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                               a.geo, acon_param_view<P>(a));
    });
  });
  return y;
}

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acon_c_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& p1, const at::Tensor& p2,
    const at::Tensor& beta, int64_t channel_dim) {
  constexpr const char* name = "fusedact.acon_c_backward";
  const AconArgs a = acon_args(name, x, p1, p2, beta, channel_dim);
  check_grad(name, grad, x);
  c10::DeviceGuard guard(x.device());
  const at::Tensor g = with_layout_of(grad, a.x);
  at::Tensor dx = at::empty_like(a.x);
  at::Tensor dp[3];
  FUSEDACT_DISPATCH(a.x.scalar_type(), [&] {
    with_param_type<scalar_t>(a.param[0].scalar_type(), [&](auto p_tag) {
      using P = decltype(p_tag);
      auto sums = B::template channel_backward<math::AconC>(
          g.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), a.geo,
          acon_param_view<P>(a), a.x.options());
      const at::Tensor* params[3] = {&p1, &p2, &beta};
      for (int j = 0; j < 3; ++j) dp[j] = as_param_grad(sums[j], *params[j]);
    });
  });
  return {dx, dp[0], dp[1], dp[2]};
}

// Registers one backend's implementations of every op under its dispatch key.
#define FUSEDACT_REGISTER_BACKEND(KEY, B)                             \
  TORCH_LIBRARY_IMPL(fusedact, KEY, m) {                              \
    m.impl("swish_forward", &fusedact::swish_forward<B>);             \
    m.impl("swish_backward", &fusedact::swish_backward<B>);           \
    m.impl("mish_forward", &fusedact::mish_forward<B>);               \
    m.impl("mish_backward", &fusedact::mish_backward<B>);             \
    m.impl("hard_swish_forward", &fusedact::hard_swish_forward<B>);   \
    m.impl("hard_swish_backward", &fusedact::hard_swish_backward<B>); \
    m.impl("acon_c_forward", &fusedact::acon_c_forward<B>);           \
    m.impl("acon_c_backward", &fusedact::acon_c_backward<B>);         \
  }

}  // namespace fusedact
