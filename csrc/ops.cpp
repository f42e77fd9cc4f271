// The schemas of every op, and nothing else: implementations sit beside their backend
// (cpu/, cuda/) and the fakes for torch.compile in fusedact/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fusedact, m) {
  // swish: beta is the float `beta`, or the one-element tensor `beta_tensor` when
  // given (learnable); swish_backward's second output is dL/dbeta in beta_tensor's
  // shape and dtype, or empty when beta_tensor is None.
  m.def("swish_forward(Tensor x, float beta, Tensor? beta_tensor) -> Tensor");
  m.def("swish_backward(Tensor grad, Tensor x, float beta, Tensor? beta_tensor) -> (Tensor, Tensor)");
  m.def("mish_forward(Tensor x) -> Tensor");
  m.def("mish_backward(Tensor grad, Tensor x) -> Tensor");
  m.def("hard_swish_forward(Tensor x) -> Tensor");
  m.def("hard_swish_backward(Tensor grad, Tensor x) -> Tensor");
  // acon_c: p1, p2 per channel; beta per channel or per (sample, channel).
  // Returns (dx, dp1, dp2, dbeta), each parameter's in its own shape and dtype.
  m.def("acon_c_forward(Tensor x, Tensor p1, Tensor p2, Tensor beta, int channel_dim) -> Tensor");
  m.def(
      "acon_c_backward(Tensor grad, Tensor x, Tensor p1, Tensor p2, Tensor beta, int channel_dim) -> (Tensor, Tensor, "
      "Tensor, Tensor)");
  // batch_norm_act's passes (fusedact/batch_norm.py): params = (mean, a, b, the
  // activation's), opmath-typed, (C,) or (N, C); channels at dim 1. bn_act_backward
  // returns dz and the per-channel sums of its slots; bn_dx BatchNorm's dx from dz.
  m.def("bn_act_forward(Tensor x, Tensor[] params, str act) -> Tensor");
  m.def("bn_act_backward(Tensor grad, Tensor x, Tensor[] params, str act) -> (Tensor, Tensor[])");
  m.def("bn_dx(Tensor dz, Tensor x, Tensor[] params) -> Tensor");
  m.def("bn_stats(Tensor x) -> (Tensor, Tensor)");                  // (mean, biased variance) per channel, opmath
  m.def("bn_moments(Tensor x, Tensor shift) -> (Tensor, Tensor)");  // sums of x - shift and its square
  // The passes with their per-channel arithmetic, one call each: (mean, invstd), updating
  // the running statistics in training; y; (dx, dweight, dbias, the act's sums).
  m.def(
      "bn_batch_stats(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
      "float eps) -> (Tensor, Tensor)");
  m.def(
      "bn_act_apply(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor[] act_params, str act) "
      "-> Tensor");
  // training: bn_batch_stats then bn_act_apply in one call, (y, mean, invstd)
  m.def(
      "bn_act_train(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, Tensor? bias, "
      "Tensor[] act_params, str act, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_grad(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, bool training, "
      "Tensor[] act_params, str act) -> (Tensor, Tensor, Tensor, Tensor[])");
}
