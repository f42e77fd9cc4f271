// How the kernels of every backend see a tensor: one dense block of memory, walked
// flat, and for the ops with parameters a channel geometry [N][R][C][inner] over that
// block. Any dense, non-overlapping layout (contiguous, channels_last, (N, L, C))
// is taken as it is; anything else goes through a contiguous copy.
#pragma once

#include <array>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>

#include "activation_math.h"
#include "checks.h"

namespace fusedact {

// Memory seen as [N][R][C][inner]: C channels, each run of `inner` consecutive
// elements has one channel, and N samples (only split out when beta is per sample;
// else N = 1 and R counts every outer index). g_gap: how many elements further apart
// the rows (N R) of the gradient walked beside x are than x's C inner; 0 where it is
// laid out as x (a backend that reads a channel slice in place, CpuBackend::
// kGradRowStride, is given another by grad_walked).
struct ChannelGeometry { int64_t N = 1, R = 0, C = 1, inner = 1, g_gap = 0; };

// Where parameter j of (sample n, channel c) lives: ptr[j][n * n_stride[j] + c].
template <typename P, int NP>
struct ParamView {
  const P* ptr[NP];
  int64_t n_stride[NP];  // 0: one value per channel; C: one per (sample, channel)

  template <typename T>
  FUSEDACT_HOST_DEVICE void load(int64_t n, int64_t c, T (&v)[NP]) const {
    for (int j = 0; j < NP; ++j) v[j] = static_cast<T>(ptr[j][n * n_stride[j] + c]);
  }
};

// batch_norm_act's training forward a channel at a time (bn_act_train): where each
// channel's statistics and affine go ((C,) opmath each), and the affine's inputs (host
// values, null where None).
template <typename T>
struct BnTrainChannels {
  T *mean, *var, *invstd, *a, *b;
  const T *weight, *bias;
  double eps;
};

// x itself when its memory is one dense block, else a dense copy in the memory format
// x suggests (channels_last or contiguous), as at::empty_like lays out its result.
inline at::Tensor dense(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : x.contiguous(x.suggest_memory_format());
}

// t with ref's strides (ref dense), so that t and ref can be walked flat together.
inline at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  at::Tensor out = at::empty_like(ref);
  out.copy_(t);
  return out;
}

// The flat geometry of an op with one scalar parameter (swish's learnable beta).
inline ChannelGeometry flat_geometry(const at::Tensor& x) {
  ChannelGeometry g;
  g.R = 1;
  g.inner = x.numel();
  return g;
}

// The tensor the kernels walk (x dense; contiguous where per-sample parameters need
// each sample to be one block, dim 0 outermost) and its geometry, channels at cd.
inline ChannelGeometry channel_geometry(const at::Tensor& x, int64_t cd, bool per_sample, at::Tensor& walked) {
  const int64_t N = per_sample ? x.size(0) : 1;
  walked = dense(x);
  const int64_t numel = walked.numel();
  if (N > 1 && numel > 0 && walked.stride(0) * N != numel) walked = x.contiguous();
  ChannelGeometry geo;
  geo.N = N;
  geo.C = x.size(cd);
  if (numel == 0) {
    geo.R = 0;
  } else {
    geo.inner = geo.C > 1 ? walked.stride(cd) : numel / N;
    geo.R = numel / (N * geo.C * geo.inner);
  }
  return geo;
}

// The row stride under which t (x's shape) walks as x does in geometry geo: each row of
// C inner elements laid out as x's, the rows evenly spaced (a channel slice of a larger
// tensor in x's memory format, as torch.cat's backward hands out). Nothing where t is
// laid out otherwise; a positive stride only.
inline c10::optional<int64_t> row_stride_of(const at::Tensor& t, const at::Tensor& x, const ChannelGeometry& geo) {
  const int64_t row = geo.C * geo.inner;
  if (t.sizes() != x.sizes()) return c10::nullopt;
  if (t.strides() == x.strides()) return row;
  if (row == 0 || geo.N * geo.R <= 1) return c10::nullopt;
  int64_t stride = 0;  // t's, between consecutive rows: from the dim whose x stride is one row
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) > 1 && x.stride(d) == row) stride = t.stride(d);
  if (stride < row) return c10::nullopt;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) == 1) continue;
    const int64_t xs = x.stride(d);
    if (xs < row ? t.stride(d) != xs : (xs % row != 0 || t.stride(d) != xs / row * stride)) return c10::nullopt;
  }
  return stride;
}

// acon_c's arguments, checked, in the form the kernels take.
struct AconArgs {
  at::Tensor x;                     // dense
  std::array<at::Tensor, 3> param;  // p1, p2, beta: contiguous, in their own shapes
  ChannelGeometry geo;
  bool beta_per_sample = false;
  int64_t channel_dim = 1;
};

// (C,) or x.dim() dims that are all 1 except channel_dim, e.g. (1, C, 1, 1).
inline bool is_channel_shape(const at::Tensor& p, const at::Tensor& x, int64_t cd) {
  const int64_t C = x.size(cd);
  if (p.dim() == 1) return p.size(0) == C;
  if (p.dim() != x.dim()) return false;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (p.size(d) != (d == cd ? C : 1)) return false;
  return true;
}

// (N, C) or x.dim() dims, N at 0, C at channel_dim, 1 elsewhere, e.g. (N, C, 1, 1).
inline bool is_sample_shape(const at::Tensor& b, const at::Tensor& x, int64_t cd) {
  if (cd == 0) return false;
  const int64_t N = x.size(0), C = x.size(cd);
  if (b.dim() == 2 && x.dim() != 2) return b.size(0) == N && b.size(1) == C;
  if (b.dim() != x.dim()) return false;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (b.size(d) != (d == 0 ? N : (d == cd ? C : 1))) return false;
  return true;
}

inline AconArgs acon_args(const char* op, const at::Tensor& x, const at::Tensor& p1, const at::Tensor& p2,
                          const at::Tensor& beta, int64_t channel_dim) {
  check_floating(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (the channels)");
  TORCH_CHECK(channel_dim >= -x.dim() && channel_dim < x.dim(), op, ": channel_dim ", channel_dim,
              " is out of range for x with ", x.dim(), " dimensions");
  AconArgs a;
  a.channel_dim = channel_dim < 0 ? channel_dim + x.dim() : channel_dim;
  const int64_t cd = a.channel_dim;
  const int64_t C = x.size(cd);
  const char* names[3] = {"p1", "p2", "beta"};
  const at::Tensor* ps[3] = {&p1, &p2, &beta};
  for (int j = 0; j < 3; ++j) {
    check_same_device(op, names[j], *ps[j], x);
    check_param_dtype(op, names[j], *ps[j], x);
  }
  TORCH_CHECK(p2.scalar_type() == p1.scalar_type() && beta.scalar_type() == p1.scalar_type(), op,
              ": p1, p2 and beta must share one dtype, got ", p1.scalar_type(), ", ", p2.scalar_type(), " and ",
              beta.scalar_type());
  for (int j = 0; j < 2; ++j)
    TORCH_CHECK(is_channel_shape(*ps[j], x, cd), op, ": ", names[j], " must have C = ", C, " elements (x.shape[", cd,
                "]), shape (C,) or x.dim() dimensions that are 1 "
                "except at channel_dim; got shape ",
                ps[j]->sizes());
  if (!is_channel_shape(beta, x, cd)) {
    TORCH_CHECK(is_sample_shape(beta, x, cd), op, ": beta must have C = ", C,
                " elements (shape (C,) or 1 except at channel_dim) or N*C elements for "
                "per-sample beta (shape (N, C) or N at dim 0, C at channel_dim, 1 elsewhere)"
                ", with N = x.shape[0] and channel_dim != 0; got shape ",
                beta.sizes());
    a.beta_per_sample = true;
  }
  for (int j = 0; j < 3; ++j) a.param[j] = ps[j]->contiguous();
  a.geo = channel_geometry(x, cd, a.beta_per_sample, a.x);
  return a;
}

template <typename P>
inline ParamView<P, 3> acon_param_view(const AconArgs& a) {
  ParamView<P, 3> v;
  for (int j = 0; j < 3; ++j) {
    v.ptr[j] = a.param[j].data_ptr<P>();
    v.n_stride[j] = 0;
  }
  v.n_stride[2] = a.beta_per_sample ? a.geo.C : 0;
  return v;
}

}  // namespace fusedact
