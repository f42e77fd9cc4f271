// The op implementations every backend shares: argument checks, layout, dtype
// dispatch and output allocation. A backend B supplies the four kernel entry points
//   B::forward<Op>(x, y, n, op)                  y = op.forward(x), flat
//   B::backward<Op>(g, x, dx, n, op)             dx = op.backward(g, x), flat
//   B::channel_forward<OpT>(x, y, geo, params)   per-channel parameters
//   B::channel_backward<OpT>(g, x, dx, geo, params, options)
//       -> the parameter gradients, summed deterministically, in the opmath type
// (g's rows geo.g_gap further apart than x's: 0 unless B::kGradRowStride, see grad_walked)
// and each backend file registers these functions for its dispatch key.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ScalarOps.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <tuple>
#include <vector>

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
    B::template forward<OpT<T>>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(), make_op(T{}));
  });
  return y;
}

template <class B, template <typename> class OpT, typename MakeOp>
at::Tensor unary_backward(const char* name, const at::Tensor& grad, const at::Tensor& x_in, MakeOp make_op) {
  check_floating(name, "x", x_in);
  check_grad(name, grad, x_in);
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor g = with_layout_of(grad, x);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  FUSEDACT_DISPATCH(x.scalar_type(), [&] {
    using T = at::opmath_type<scalar_t>;
    B::template backward<OpT<T>>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), x.numel(),
                                 make_op(T{}));
  });
  return dx;
}

// The gradient as B walks it beside x (dense, geometry geo): grad itself where B takes
// a row stride and grad has one (geo.g_gap set; channel slices from torch.cat's backward
// read in place), else grad in x's layout.
template <class B>
at::Tensor grad_walked(const at::Tensor& grad, const at::Tensor& x, ChannelGeometry& geo) {
  if constexpr (B::kGradRowStride) {
    if (const auto stride = row_stride_of(grad, x, geo)) {
      geo.g_gap = *stride - geo.C * geo.inner;
      return grad;
    }
  }
  return with_layout_of(grad, x);
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
  TORCH_CHECK(b.numel() == 1, name,
              ": beta must be a float or a tensor with one element, "
              "got shape ",
              b.sizes());
}

template <class B>
at::Tensor swish_forward(const at::Tensor& x, double beta, const c10::optional<at::Tensor>& beta_tensor) {
  constexpr const char* name = "fusedact.swish";
  if (!beta_tensor.has_value()) check_float_beta(name, x, beta);
  if (!beta_tensor.has_value() && beta == 1.0)
    return unary_forward<B, math::Silu>(name, x, [](auto t) { return math::Silu<decltype(t)>{}; });
  if (!beta_tensor.has_value())
    return unary_forward<B, math::Swish>(
        name, x, [&](auto t) { return math::Swish<decltype(t)>{static_cast<decltype(t)>(beta)}; });
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
      B::template channel_forward<math::Swish>(xd.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), flat_geometry(xd), pv);
    });
  });
  return y;
}

// Returns (dx, dbeta); dbeta has beta_tensor's shape and dtype, or is empty when beta
// was a Python float.
template <class B>
std::tuple<at::Tensor, at::Tensor> swish_backward(const at::Tensor& grad, const at::Tensor& x, double beta,
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
      auto sums =
          B::template channel_backward<math::Swish>(g.data_ptr<scalar_t>(), xd.data_ptr<scalar_t>(),
                                                    dx.data_ptr<scalar_t>(), flat_geometry(xd), pv, xd.options());
      dbeta = as_param_grad(sums[0], *beta_tensor);
    });
  });
  return {dx, dbeta};
}

// ---- mish, hard_swish

template <class B>
at::Tensor mish_forward(const at::Tensor& x) {
  return unary_forward<B, math::Mish>("fusedact.mish", x, [](auto t) { return math::Mish<decltype(t)>{}; });
}

template <class B>
at::Tensor mish_backward(const at::Tensor& grad, const at::Tensor& x) {
  return unary_backward<B, math::Mish>("fusedact.mish_backward", grad, x,
                                       [](auto t) { return math::Mish<decltype(t)>{}; });
}

template <class B>
at::Tensor hard_swish_forward(const at::Tensor& x) {
  return unary_forward<B, math::HardSwish>("fusedact.hard_swish", x,
                                           [](auto t) { return math::HardSwish<decltype(t)>{}; });
}

template <class B>
at::Tensor hard_swish_backward(const at::Tensor& grad, const at::Tensor& x) {
  return unary_backward<B, math::HardSwish>("fusedact.hard_swish_backward", grad, x,
                                            [](auto t) { return math::HardSwish<decltype(t)>{}; });
}

// ---- acon_c

template <class B>
at::Tensor acon_c_forward(const at::Tensor& x, const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& beta,
                          int64_t channel_dim) {
  const AconArgs a = acon_args("fusedact.acon_c", x, p1, p2, beta, channel_dim);
  c10::DeviceGuard guard(x.device());
  at::Tensor y = at::empty_like(a.x);
  if (a.x.numel() == 0) return y;
  FUSEDACT_DISPATCH(a.x.scalar_type(), [&] {
    with_param_type<scalar_t>(a.param[0].scalar_type(), [&](auto p_tag) {
      using P = decltype(p_tag);
      B::template channel_forward<math::AconC>(a.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a.geo,
                                               acon_param_view<P>(a));
    });
  });
  return y;
}

template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acon_c_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                           const at::Tensor& p1, const at::Tensor& p2,
                                                                           const at::Tensor& beta,
                                                                           int64_t channel_dim) {
  constexpr const char* name = "fusedact.acon_c_backward";
  AconArgs a = acon_args(name, x, p1, p2, beta, channel_dim);
  check_grad(name, grad, x);
  c10::DeviceGuard guard(x.device());
  const at::Tensor g = grad_walked<B>(grad, a.x, a.geo);
  at::Tensor dx = at::empty_like(a.x);
  at::Tensor dp[3];
  FUSEDACT_DISPATCH(a.x.scalar_type(), [&] {
    with_param_type<scalar_t>(a.param[0].scalar_type(), [&](auto p_tag) {
      using P = decltype(p_tag);
      auto sums = B::template channel_backward<math::AconC>(g.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(),
                                                            dx.data_ptr<scalar_t>(), a.geo, acon_param_view<P>(a),
                                                            a.x.options());
      const at::Tensor* params[3] = {&p1, &p2, &beta};
      for (int j = 0; j < 3; ++j) dp[j] = as_param_grad(sums[j], *params[j]);
    });
  });
  return {dx, dp[0], dp[1], dp[2]};
}

// ---- batch_norm_act's passes (fusedact/batch_norm.py): params are opmath-typed
// (C,) tensors, or (N, C) for a per-sample one (acon_c's beta); channels at dim 1.

struct BnArgs {
  at::Tensor x;  // as the kernels walk it
  std::vector<at::Tensor> params;
  ChannelGeometry geo;
  std::vector<int64_t> n_stride;
};

inline BnArgs bn_args(const char* op, const at::Tensor& x, at::TensorList params, size_t count) {
  check_floating(op, "x", x);
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (N, C, ...), got ", x.dim(), " dimension(s)");
  TORCH_CHECK(params.size() == count, op, ": expected ", count, " parameter tensors, got ", params.size());
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = x.size(0), C = x.size(1);
  BnArgs a;
  bool per_sample = false;
  for (const at::Tensor& p : params) {
    check_same_device(op, "params", p, x);
    TORCH_CHECK(p.scalar_type() == opmath, op, ": params must be ", opmath, " for ", x.scalar_type(), " x, got ",
                p.scalar_type());
    const bool sample = p.numel() == N * C && p.numel() != C;
    TORCH_CHECK(p.numel() == C || sample, op, ": params must have C = ", C, " or N * C elements, got ", p.sizes());
    per_sample = per_sample || sample;
    a.params.push_back(p.contiguous());
    a.n_stride.push_back(sample ? C : 0);
  }
  a.geo = channel_geometry(x, 1, per_sample, a.x);
  return a;
}

template <typename P, int NP>
inline ParamView<P, NP> bn_param_view(const BnArgs& a) {
  ParamView<P, NP> v;
  for (int j = 0; j < NP; ++j) {
    v.ptr[j] = a.params[j].data_ptr<P>();
    v.n_stride[j] = a.n_stride[j];
  }
  return v;
}

template <class B, template <typename> class OpT>
at::Tensor bn_forward(const at::Tensor& x, at::TensorList params) {
  constexpr const char* name = "fusedact.bn_act_forward";
  c10::DeviceGuard guard(x.device());
  at::Tensor y;
  FUSEDACT_DISPATCH(x.scalar_type(), [&] {
    using P = at::opmath_type<scalar_t>;
    constexpr int NP = OpT<P>::kParams;
    const BnArgs a = bn_args(name, x, params, NP);
    y = at::empty_like(a.x);
    if (a.x.numel() == 0) return;
    B::template channel_forward<OpT>(a.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a.geo, bn_param_view<P, NP>(a));
  });
  return y;
}

// (dx or dz, the per-channel sums of every slot, in opmath)
template <class B, template <typename> class OpT>
std::tuple<at::Tensor, std::vector<at::Tensor>> bn_backward(const char* name, const at::Tensor& grad,
                                                            const at::Tensor& x, at::TensorList params) {
  check_grad(name, grad, x);
  c10::DeviceGuard guard(x.device());
  at::Tensor dx;
  std::vector<at::Tensor> sums;
  FUSEDACT_DISPATCH(x.scalar_type(), [&] {
    using P = at::opmath_type<scalar_t>;
    constexpr int NP = OpT<P>::kParams;
    BnArgs a = bn_args(name, x, params, NP);
    const at::Tensor g = grad_walked<B>(grad, a.x, a.geo);
    // an op that only sums writes nothing: dx stays undefined, its pointer never written
    constexpr bool writes = math::kWrites<OpT<P>>;
    if (writes) dx = at::empty_like(a.x);
    scalar_t* out = writes ? dx.data_ptr<scalar_t>() : const_cast<scalar_t*>(a.x.data_ptr<scalar_t>());
    auto s = B::template channel_backward<OpT>(g.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), out, a.geo,
                                               bn_param_view<P, NP>(a), a.x.options());
    for (int j = 0; j < NP; ++j) sums.push_back(s[j]);
  });
  return {dx, sums};
}

// A channel's statistics from the sums of its two read-only passes: the second pass's
// shift from the first's sum, then (mean, biased variance); invstd from the variance.
// Not inlined, one compiled copy for bn_stats and for CpuBackend's forward a channel at
// a time, whose ISA-specific loops would otherwise contract s2 / M - d * d into an FMA
// where bn_stats does not (the two are bitwise the same).
template <typename T>
__attribute__((noinline)) T bn_shift(double s1, int64_t M) {
  return static_cast<T>(s1 / M);
}
template <typename T>
__attribute__((noinline)) void bn_channel_stats(T shift, double s1, double s2, int64_t M, T& mean, T& var) {
  const double d = s1 / M;  // the residual of the shift, tiny (NaN about an infinite mean)
  mean = static_cast<T>(std::isfinite(d) ? shift + d : double(shift));
  var = static_cast<T>(std::max(0.0, s2 / M - d * d));
}
template <typename T>
__attribute__((noinline)) T bn_invstd(T var, double eps) {
  return T(1) / std::sqrt(var + static_cast<T>(eps));
}

// batch_norm_act's batch statistics: (mean, biased variance) per channel (dim 1), in
// opmath, two read-only passes (the mean, then the squares about it).
template <class B>
std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& x_in) {
  constexpr const char* name = "fusedact.bn_stats";
  check_floating(name, "x", x_in);
  TORCH_CHECK(x_in.dim() >= 2, name, ": x must be (N, C, ...), got ", x_in.dim(), " dimension(s)");
  c10::DeviceGuard guard(x_in.device());
  at::Tensor x;
  const ChannelGeometry geo = channel_geometry(x_in, 1, false, x);
  const int64_t C = geo.C, M = C ? x.numel() / C : 0;
  TORCH_CHECK(M > 0, name, ": x has no elements per channel");
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({C}, x.options().dtype(opmath)), var = at::empty({C}, x.options().dtype(opmath));
  FUSEDACT_DISPATCH(x.scalar_type(), [&] {
    using T = at::opmath_type<scalar_t>;
    std::vector<T> shift(C);
    std::vector<double> s1(C), s2(C);
    B::channel_sums(x.data_ptr<scalar_t>(), geo, static_cast<const T*>(nullptr), s1.data(), s2.data());  // x's sums
    for (int64_t c = 0; c < C; ++c) shift[c] = bn_shift<T>(s1[c], M);
    B::channel_sums(x.data_ptr<scalar_t>(), geo, shift.data(), s1.data(), s2.data());
    T* m = mean.data_ptr<T>();
    T* v = var.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) bn_channel_stats<T>(shift[c], s1[c], s2[c], M, m[c], v[c]);
  });
  return {mean, var};
}

// (sum(x - shift), sum((x - shift)^2)) per channel (dim 1) in opmath, shift (C,) opmath:
// one read-only pass of x reduced on its device (math::BnMoments through the channel
// kernels), which the GPU's batch statistics take twice (fusedact/batch_norm.py,
// _moment_stats): the mean, then the squares about it.
template <class B>
std::tuple<at::Tensor, at::Tensor> bn_moments(const at::Tensor& x, const at::Tensor& shift) {
  TORCH_CHECK(shift.dim() == 1 && x.dim() >= 2 && shift.numel() == x.size(1),
              "fusedact.bn_moments: shift must be (C,), one value a channel of x");
  auto [unused, s] = bn_backward<B, math::BnMoments>("fusedact.bn_moments", x, x, {shift, shift});
  return {s[0], s[1]};
}

// The activation by name: CALL(OpT) with OpT the FAMILY (math::BnAct, BnActSums,
// BnActDx) of that activation.
#define FUSEDACT_BN_ACT_DISPATCH_OF(FAMILY, ACT, NAME, CALL)                        \
  if (ACT == "identity") return CALL(math::FAMILY<math::Identity>::template Op);    \
  if (ACT == "silu") return CALL(math::FAMILY<math::Silu>::template Op);            \
  if (ACT == "swish") return CALL(math::FAMILY<math::Swish>::template Op);          \
  if (ACT == "mish") return CALL(math::FAMILY<math::Mish>::template Op);            \
  if (ACT == "hard_swish") return CALL(math::FAMILY<math::HardSwish>::template Op); \
  if (ACT == "acon_c") return CALL(math::FAMILY<math::AconC>::template Op);         \
  TORCH_CHECK(false, NAME, ": unknown act '", ACT, "' (identity, silu, swish, mish, hard_swish, acon_c)")
#define FUSEDACT_BN_ACT_DISPATCH(ACT, NAME, CALL) FUSEDACT_BN_ACT_DISPATCH_OF(BnAct, ACT, NAME, CALL)

template <class B>
at::Tensor bn_act_forward(const at::Tensor& x, at::TensorList params, c10::string_view act) {
#define FUSEDACT_CALL(OPT) bn_forward<B, OPT>(x, params)
  FUSEDACT_BN_ACT_DISPATCH(act, "fusedact.bn_act_forward", FUSEDACT_CALL);
#undef FUSEDACT_CALL
}

// (dz, sums): slot 0 sum(dz (x - mean)), 1 sum(dz), 2 zero, then the activation's.
template <class B>
std::tuple<at::Tensor, std::vector<at::Tensor>> bn_act_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                at::TensorList params, c10::string_view act) {
#define FUSEDACT_CALL(OPT) bn_backward<B, OPT>("fusedact.bn_act_backward", grad, x, params)
  FUSEDACT_BN_ACT_DISPATCH(act, "fusedact.bn_act_backward", FUSEDACT_CALL);
#undef FUSEDACT_CALL
}

// dx = k1 dz + k2 (x - mean) + c per channel; params = (k1, k2, mean, c).
template <class B>
at::Tensor bn_dx(const at::Tensor& dz, const at::Tensor& x, at::TensorList params) {
  return std::get<0>(bn_backward<B, math::BnDx>("fusedact.bn_dx", dz, x, params));
}

// ---- batch_norm_act's passes with their per-channel arithmetic, one call each (the
// eager path's and the native graph ops'; fusedact/batch_norm.py): the dozen small
// tensor ops around the passes cost more than the passes on a small block, so the
// arithmetic runs in loops over the channels, on host memory: these ops are registered
// for the CPU alone (a device backend needs it in a kernel).

inline at::ScalarType bn_opmath(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// f(R* values) on a (C,) tensor t of any floating dtype R, in place: values is t's
// memory (or a contiguous copy, written back).
template <typename F>
void bn_update_in_place(const at::Tensor& t, F&& f) {
  at::Tensor c = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fusedact.bn_batch_stats", [&] {
    scalar_t* p = c.data_ptr<scalar_t>();
    f(p);
  });
  if (!c.is_same(t)) t.copy_(c);
}

// (C,) values of t (any floating dtype) as T, in `out`.
template <typename T>
std::vector<T> bn_host_values(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::vector<T> out(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fusedact.bn_act", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<T>(p[i]);
  });
  return out;
}

inline void bn_check_running(const char* name, const c10::optional<at::Tensor>& running_mean,
                             const c10::optional<at::Tensor>& running_var, bool training) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), name,
              ": give both running_mean and running_var, or neither");
  TORCH_CHECK(training || running_mean.has_value(), name, ": training=False needs running_mean and running_var");
}

// The running statistics updated as nn.BatchNorm2d does from the batch's (C,) opmath mean
// and biased variance of x (the unbiased variance; momentum), in double, rounded once to
// their dtype. Nothing where there are none.
inline void bn_update_running(const char* name, const at::Tensor& x, const c10::optional<at::Tensor>& running_mean,
                              const c10::optional<at::Tensor>& running_var, const at::Tensor& mean,
                              const at::Tensor& var, double momentum) {
  if (!running_mean.has_value()) return;
  const int64_t C = mean.numel();
  TORCH_CHECK(running_mean->numel() == C && running_var->numel() == C, name, ": running statistics must have C = ", C,
              " elements");
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "fusedact.bn_update_running", [&] {
    const scalar_t* m = mean.data_ptr<scalar_t>();
    const scalar_t* v = var.data_ptr<scalar_t>();
    const double M = double(x.numel() / x.size(1)), unbias = M / std::max(M - 1, 1.0);
    at::NoGradGuard no_grad;
    bn_update_in_place(*running_mean, [&](auto* r) {
      using R = std::remove_pointer_t<decltype(r)>;
      for (int64_t c = 0; c < C; ++c) r[c] = static_cast<R>((1 - momentum) * double(r[c]) + momentum * double(m[c]));
    });
    bn_update_in_place(*running_var, [&](auto* r) {
      using R = std::remove_pointer_t<decltype(r)>;
      for (int64_t c = 0; c < C; ++c)
        r[c] = static_cast<R>((1 - momentum) * double(r[c]) + momentum * (double(v[c]) * unbias));
    });
  });
}

// (mean, invstd) per channel in opmath; in training x's batch statistics, and the running
// ones updated (bn_update_running).
template <class B>
std::tuple<at::Tensor, at::Tensor> bn_batch_stats(const at::Tensor& x, const c10::optional<at::Tensor>& running_mean,
                                                  const c10::optional<at::Tensor>& running_var, bool training,
                                                  double momentum, double eps) {
  constexpr const char* name = "fusedact.bn_batch_stats";
  const auto pt = bn_opmath(x);
  bn_check_running(name, running_mean, running_var, training);
  at::Tensor mean, var;
  if (training) {
    std::tie(mean, var) = bn_stats<B>(x);
  } else {
    mean = running_mean->to(pt, /*non_blocking=*/false, /*copy=*/true);
    var = running_var->to(pt).contiguous();
  }
  at::Tensor invstd = at::empty_like(mean);
  const int64_t C = mean.numel();
  AT_DISPATCH_FLOATING_TYPES(pt, name, [&] {
    const scalar_t* v = var.data_ptr<scalar_t>();
    scalar_t* inv = invstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) inv[c] = bn_invstd<scalar_t>(v[c], eps);
  });
  if (training) bn_update_running(name, x, running_mean, running_var, mean, var, momentum);
  return {mean, invstd};
}

// (mean, a, b, the activation's): the passes' parameters, a = weight invstd, b = bias,
// each rounded as the Python composition's tensor ops round them (bitwise the same).
inline std::vector<at::Tensor> bn_pass_params(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                              const c10::optional<at::Tensor>& weight,
                                              const c10::optional<at::Tensor>& bias, at::TensorList act_params) {
  const auto pt = bn_opmath(x);
  TORCH_CHECK(mean.scalar_type() == pt && invstd.scalar_type() == pt && invstd.dim() == 1,
              "fusedact.bn_act: mean and invstd must be (C,) ", pt, " tensors");
  at::Tensor a = weight.has_value() ? at::empty_like(invstd) : invstd, b = at::empty_like(invstd);
  AT_DISPATCH_FLOATING_TYPES(pt, "fusedact.bn_act", [&] {
    const int64_t C = invstd.numel();
    const scalar_t* inv = invstd.data_ptr<scalar_t>();
    if (weight.has_value()) {
      const std::vector<scalar_t> w = bn_host_values<scalar_t>(*weight);
      TORCH_CHECK(int64_t(w.size()) == C, "fusedact.bn_act: weight must have C = ", C, " elements");
      for (int64_t c = 0; c < C; ++c) a.data_ptr<scalar_t>()[c] = w[c] * inv[c];
    }
    const std::vector<scalar_t> bv = bias.has_value() ? bn_host_values<scalar_t>(*bias) : std::vector<scalar_t>(C);
    TORCH_CHECK(int64_t(bv.size()) == C, "fusedact.bn_act: bias must have C = ", C, " elements");
    std::copy(bv.begin(), bv.end(), b.data_ptr<scalar_t>());
  });
  std::vector<at::Tensor> params{mean, a, b};
  params.insert(params.end(), act_params.begin(), act_params.end());
  return params;
}

// y = act((x - mean) invstd weight + bias)
template <class B>
at::Tensor bn_act_apply(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                        const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                        at::TensorList act_params, c10::string_view act) {
  return bn_act_forward<B>(x, bn_pass_params(x, mean, invstd, weight, bias, act_params), act);
}

// bn_act_train a channel at a time (B::channel_train_forward, OpT = BnAct's): (y, mean,
// biased variance, invstd), or nothing where the backend does not take x's geometry or
// a parameter is per sample.
template <class B, template <typename> class OpT>
c10::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> bn_train_by_channel(
    const char* name, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, at::TensorList act_params, double eps) {
  c10::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> out;
  check_floating(name, "x", x);
  if (x.dim() < 2) return out;  // bn_batch_stats says what is wrong
  FUSEDACT_DISPATCH(x.scalar_type(), [&] {
    using P = at::opmath_type<scalar_t>;
    constexpr int NP = OpT<P>::kParams;
    if (int64_t(act_params.size()) != NP - 3) return;
    const int64_t C = x.size(1);
    const auto options = x.options().dtype(c10::CppTypeToScalarType<P>::value);
    at::Tensor mean = at::empty({C}, options), var = at::empty({C}, options), invstd = at::empty({C}, options);
    at::Tensor a = at::empty({C}, options), b = at::empty({C}, options);
    std::vector<at::Tensor> params{mean, a, b};
    params.insert(params.end(), act_params.begin(), act_params.end());
    const BnArgs args = bn_args(name, x, params, NP);
    for (int j = 0; j < NP; ++j)
      if (args.n_stride[j]) return;
    if (args.x.numel() == 0) return;
    // weight and bias checked before any geometry falls back to bn_batch_stats, which
    // updates the running statistics
    const std::vector<P> w = weight.has_value() ? bn_host_values<P>(*weight) : std::vector<P>();
    const std::vector<P> bv = bias.has_value() ? bn_host_values<P>(*bias) : std::vector<P>();
    TORCH_CHECK(!weight.has_value() || int64_t(w.size()) == C, name, ": weight must have C = ", C, " elements");
    TORCH_CHECK(!bias.has_value() || int64_t(bv.size()) == C, name, ": bias must have C = ", C, " elements");
    const ParamView<P, NP> pv = bn_param_view<P, NP>(args);
    if (!B::trains_by_channel(args.geo, pv)) return;  // before y is allocated
    at::Tensor y = at::empty_like(args.x);
    const BnTrainChannels<P> channels{mean.data_ptr<P>(),
                                      var.data_ptr<P>(),
                                      invstd.data_ptr<P>(),
                                      a.data_ptr<P>(),
                                      b.data_ptr<P>(),
                                      w.empty() ? nullptr : w.data(),
                                      bv.empty() ? nullptr : bv.data(),
                                      eps};
    B::template channel_train_forward<OpT>(args.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), args.geo, pv, channels);
    out.emplace(y, mean, var, invstd);
  });
  return out;
}

// batch_norm_act's training forward in one call: (y, mean, invstd), the running
// statistics updated. Bitwise bn_batch_stats then bn_act_apply; where the backend takes
// a channel at a time (short channel runs, NCHW-like), a channel's statistics and y in
// one go, its x read from memory once rather than three times.
template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_train(
    const at::Tensor& x, const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, at::TensorList act_params,
    c10::string_view act, double momentum, double eps) {
  constexpr const char* name = "fusedact.bn_act_train";
  bn_check_running(name, running_mean, running_var, true);
#define FUSEDACT_CALL(OPT) bn_train_by_channel<B, OPT>(name, x, weight, bias, act_params, eps)
  auto by_channel = [&] { FUSEDACT_BN_ACT_DISPATCH(act, name, FUSEDACT_CALL); }();
#undef FUSEDACT_CALL
  if (!by_channel.has_value()) {
    auto [mean, invstd] = bn_batch_stats<B>(x, running_mean, running_var, true, momentum, eps);
    return {bn_act_apply<B>(x, mean, invstd, weight, bias, act_params, act), mean, invstd};
  }
  auto& [y, mean, var, invstd] = *by_channel;
  bn_update_running(name, x, running_mean, running_var, mean, var, momentum);
  return {y, mean, invstd};
}

// (C,) opmath values f(c) rounded to t's dtype, in a new tensor like t.
template <typename T, typename F>
at::Tensor bn_per_channel_like(const at::Tensor& t, int64_t C, F&& f) {
  at::Tensor out = at::empty({C}, t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fusedact.bn_act_grad", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(f(c));
  });
  return out;
}

// bn_act_grad's two passes a channel at a time (B::channel_grad, OpT = BnAct's): (dx, the
// sums of every slot), or nothing where the backend does not take x's geometry.
template <class B, template <typename> class OpT>
c10::optional<std::tuple<at::Tensor, std::vector<at::Tensor>>> bn_grad_by_channel(
    const char* name, const at::Tensor& grad, const at::Tensor& x, at::TensorList params, const at::Tensor& invstd,
    bool training) {
  check_grad(name, grad, x);
  c10::optional<std::tuple<at::Tensor, std::vector<at::Tensor>>> out;
  FUSEDACT_DISPATCH(x.scalar_type(), [&] {
    using P = at::opmath_type<scalar_t>;
    constexpr int NP = OpT<P>::kParams;
    BnArgs a = bn_args(name, x, params, NP);
    const ParamView<P, NP> pv = bn_param_view<P, NP>(a);
    if (!B::grads_by_channel(a.geo, pv)) return;  // before grad's copy and dx
    const at::Tensor g = grad_walked<B>(grad, a.x, a.geo);
    at::Tensor dx = at::empty_like(a.x);
    at::Tensor sums = at::empty({NP, a.geo.C}, a.x.options().dtype(c10::CppTypeToScalarType<P>::value));
    B::template channel_grad<OpT>(g.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), a.geo, pv,
                                  invstd.data_ptr<P>(), training, sums.data_ptr<P>());
    std::vector<at::Tensor> list;
    for (int j = 0; j < NP; ++j) list.push_back(j < 3 ? sums[j] : sums[j].clone());  // outputs may not alias
    out.emplace(dx, std::move(list));
  });
  return out;
}

// The sizes of x from which bn_act_grad recomputes dz rather than store it (below).
constexpr int64_t kBnRecomputeCheapBytes = int64_t(8) << 20;
constexpr int64_t kBnRecomputeBytes = int64_t(32) << 20;

// (dx, dweight, dbias, the activation's parameter sums): dweight and dbias in their
// parameter's dtype (empty where it is None), the sums flat in opmath.
template <class B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> bn_act_grad(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    at::TensorList act_params, c10::string_view act) {
  constexpr const char* name = "fusedact.bn_act_grad";
  std::vector<at::Tensor> params = bn_pass_params(x, mean, invstd, weight, bias, act_params);
  const at::Tensor a = params[1];
  const int64_t C = a.numel();
  // dweight = sum(dz (x - mean)) invstd, dbias = sum(dz), in their parameters' dtypes
  auto parameter_grads = [&](const std::vector<at::Tensor>& sums) {
    at::Tensor dweight, dbias;
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), name, [&] {
      using T = scalar_t;
      const T *inv = invstd.data_ptr<T>(), *s_xm = sums[0].data_ptr<T>(), *s_dz = sums[1].data_ptr<T>();
      dweight = weight.has_value() ? bn_per_channel_like<T>(*weight, C, [&](int64_t j) { return s_xm[j] * inv[j]; })
                                   : x.new_empty({0});
      dbias =
          bias.has_value() ? bn_per_channel_like<T>(*bias, C, [&](int64_t j) { return s_dz[j]; }) : x.new_empty({0});
    });
    return std::make_tuple(dweight, dbias);
  };
  // short channel runs: both passes a channel at a time (CpuBackend::channel_grad)
#define FUSEDACT_CALL(OPT) bn_grad_by_channel<B, OPT>(name, grad, x, params, invstd, training)
  auto by_channel = [&] { FUSEDACT_BN_ACT_DISPATCH_OF(BnAct, act, name, FUSEDACT_CALL); }();
#undef FUSEDACT_CALL
  if (by_channel.has_value()) {
    auto& [dx, sums] = *by_channel;
    auto [dweight, dbias] = parameter_grads(sums);
    return {dx, dweight, dbias, std::vector<at::Tensor>(sums.begin() + 3, sums.end())};
  }
  // dz recomputed in the dx pass (never written) where that measured faster: identity
  // always; hard_swish from kBnRecomputeCheapBytes of x; SiLU, swish and Mish with
  // float32/float64 x from kBnRecomputeBytes. Below those, x, g and dz stay in cache and a
  // second evaluation of the derivative costs more than dz's trip; 16-bit x with a costly
  // backward and ACON-C throughout store dz once and read it back.
  // Measurements: benchmarks/NOTES.md, "BatchNorm + activation", third and fourth passes.
  const bool lowp = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const int64_t bytes = x.numel() * int64_t(x.element_size());
  const bool recompute = act == "identity" || (act == "hard_swish" && bytes >= kBnRecomputeCheapBytes) ||
                         (!lowp && act != "acon_c" && act != "hard_swish" && bytes >= kBnRecomputeBytes);
  at::Tensor dz;
  std::vector<at::Tensor> sums;
  if (recompute) {
#define FUSEDACT_CALL(OPT) std::get<1>(bn_backward<B, OPT>(name, grad, x, params))
    sums = [&] { FUSEDACT_BN_ACT_DISPATCH_OF(BnActSums, act, name, FUSEDACT_CALL); }();
#undef FUSEDACT_CALL
  } else {
    std::tie(dz, sums) = bn_act_backward<B>(grad, x, params, act);
  }
  // dx's coefficients per channel (math::bn_dx_coefficients)
  at::Tensor k2 = at::empty_like(a), c = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), name, [&] {
    using T = scalar_t;
    const T *pa = a.data_ptr<T>(), *inv = invstd.data_ptr<T>();
    const T *s_xm = sums[0].data_ptr<T>(), *s_dz = sums[1].data_ptr<T>();
    const T M = static_cast<T>(C ? x.numel() / C : 0);
    T *pk2 = k2.data_ptr<T>(), *pc = c.data_ptr<T>();
    for (int64_t j = 0; j < C; ++j)
      math::bn_dx_coefficients<T>(pa[j], inv[j], s_xm[j], s_dz[j], M, training, pk2[j], pc[j]);
  });
  auto [dweight, dbias] = parameter_grads(sums);
  at::Tensor dx;
  if (recompute) {
    params.insert(params.begin(), {k2, c});
#define FUSEDACT_CALL(OPT) std::get<0>(bn_backward<B, OPT>(name, grad, x, params))
    dx = [&] { FUSEDACT_BN_ACT_DISPATCH_OF(BnActDx, act, name, FUSEDACT_CALL); }();
#undef FUSEDACT_CALL
  } else {
    dx = bn_dx<B>(dz, x, {a, k2, mean, c});
  }
  return {dx, dweight, dbias, std::vector<at::Tensor>(sums.begin() + 3, sums.end())};
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

// batch_norm_act's passes, every backend: the elementwise passes and the moments, all
// through the channel kernels (B::channel_forward / channel_backward).
#define FUSEDACT_REGISTER_BN_PASSES(KEY, B)                   \
  TORCH_LIBRARY_IMPL(fusedact, KEY, m) {                      \
    m.impl("bn_act_forward", &fusedact::bn_act_forward<B>);   \
    m.impl("bn_act_backward", &fusedact::bn_act_backward<B>); \
    m.impl("bn_dx", &fusedact::bn_dx<B>);                     \
    m.impl("bn_moments", &fusedact::bn_moments<B>);           \
  }

// The CPU's own: statistics summed in double (B::channel_sums) and the one-call ops
// whose per-channel arithmetic runs in host loops. A GPU composes these from the passes
// above in fusedact/batch_norm.py.
#define FUSEDACT_REGISTER_BN_ACT(KEY, B)                    \
  FUSEDACT_REGISTER_BN_PASSES(KEY, B)                       \
  TORCH_LIBRARY_IMPL(fusedact, KEY, m) {                    \
    m.impl("bn_stats", &fusedact::bn_stats<B>);             \
    m.impl("bn_batch_stats", &fusedact::bn_batch_stats<B>); \
    m.impl("bn_act_apply", &fusedact::bn_act_apply<B>);     \
    m.impl("bn_act_train", &fusedact::bn_act_train<B>);     \
    m.impl("bn_act_grad", &fusedact::bn_act_grad<B>);       \
  }

}  // namespace fusedact
