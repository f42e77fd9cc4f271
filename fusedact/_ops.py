"""Fake (meta) implementations of every fused op, forward and backward, so that
torch.compile traces them without running them and without graph breaks. Each checks
what the C++ op checks and returns outputs with the shapes, dtypes and strides the
real op returns."""

from __future__ import annotations

import torch
from torch.library import register_fake

from ._opinfo import OPS, output_like
from .checks import check_acon_args, check_float_beta, check_grad, check_swish_beta, check_x


def param_grad(p: torch.Tensor) -> torch.Tensor:
    return p.new_empty(p.shape)


@register_fake("fusedact::swish_forward")
def _swish_forward(x, beta, beta_tensor):
    check_x("fusedact.swish", x)
    if beta_tensor is not None:
        check_swish_beta("fusedact.swish", beta_tensor, x)
    else:
        check_float_beta("fusedact.swish", beta, x)
    return output_like(x)


@register_fake("fusedact::swish_backward")
def _swish_backward(grad, x, beta, beta_tensor):
    check_x("fusedact.swish_backward", x)
    check_grad("fusedact.swish_backward", grad, x)
    if beta_tensor is None:
        check_float_beta("fusedact.swish_backward", beta, x)
        return output_like(x), x.new_empty((0,))
    check_swish_beta("fusedact.swish_backward", beta_tensor, x)
    return output_like(x), param_grad(beta_tensor)


def _register_unary(name: str) -> None:
    @register_fake(f"fusedact::{name}_forward")
    def _forward(x):
        check_x(f"fusedact.{name}", x)
        return output_like(x)

    @register_fake(f"fusedact::{name}_backward")
    def _backward(grad, x):
        check_x(f"fusedact.{name}_backward", x)
        check_grad(f"fusedact.{name}_backward", grad, x)
        return output_like(x)


for _op in OPS:
    if _op.unary:
        _register_unary(_op.name)


@register_fake("fusedact::acon_c_forward")
def _acon_c_forward(x, p1, p2, beta, channel_dim):
    _, per_sample = check_acon_args("fusedact.acon_c", x, p1, p2, beta, channel_dim)
    return output_like(x, per_sample)


@register_fake("fusedact::acon_c_backward")
def _acon_c_backward(grad, x, p1, p2, beta, channel_dim):
    op = "fusedact.acon_c_backward"
    _, per_sample = check_acon_args(op, x, p1, p2, beta, channel_dim)
    check_grad(op, grad, x)
    return output_like(x, per_sample), param_grad(p1), param_grad(p2), param_grad(beta)


# ---- batch_norm_act's passes (fusedact/batch_norm.py)


def _bn_out(x, params):
    per_sample = any(p.numel() != x.shape[1] for p in params)
    return output_like(x, per_sample)


@register_fake("fusedact::bn_act_forward")
def _bn_act_forward(x, params, act):
    check_x("fusedact.bn_act_forward", x)
    return _bn_out(x, params)


@register_fake("fusedact::bn_act_backward")
def _bn_act_backward(grad, x, params, act):
    check_x("fusedact.bn_act_backward", x)
    check_grad("fusedact.bn_act_backward", grad, x)
    return _bn_out(x, params), [p.new_empty((p.numel(),)) for p in params]  # flat: (C,) or (N * C,)


@register_fake("fusedact::bn_dx")
def _bn_dx(dz, x, params):
    check_x("fusedact.bn_dx", x)
    check_grad("fusedact.bn_dx", dz, x)
    return _bn_out(x, params)


@register_fake("fusedact::bn_stats")
def _bn_stats(x):
    check_x("fusedact.bn_stats", x)
    stat = _opmath_stat(x)
    return stat, torch.empty_like(stat)


@register_fake("fusedact::bn_moments")
def _bn_moments(x, shift):
    check_x("fusedact.bn_moments", x)
    stat = _opmath_stat(x)
    return stat, torch.empty_like(stat)


def _opmath_stat(x):
    return x.new_empty((x.shape[1],), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@register_fake("fusedact::bn_batch_stats")
def _bn_batch_stats(x, running_mean, running_var, training, momentum, eps):
    check_x("fusedact.bn_batch_stats", x)
    stat = _opmath_stat(x)
    return stat, torch.empty_like(stat)


@register_fake("fusedact::bn_act_apply")
def _bn_act_apply(x, mean, invstd, weight, bias, act_params, act):
    check_x("fusedact.bn_act_apply", x)
    return _bn_out(x, act_params)


@register_fake("fusedact::bn_act_train")
def _bn_act_train(x, running_mean, running_var, weight, bias, act_params, act, momentum, eps):
    check_x("fusedact.bn_act_train", x)
    stat = _opmath_stat(x)
    return _bn_out(x, act_params), stat, torch.empty_like(stat)


@register_fake("fusedact::bn_act_grad")
def _bn_act_grad(grad, x, weight, bias, mean, invstd, training, act_params, act):
    check_x("fusedact.bn_act_grad", x)
    check_grad("fusedact.bn_act_grad", grad, x)

    def like(p):
        return p.new_empty(p.shape) if p is not None else x.new_empty((0,))

    return _bn_out(x, act_params), like(weight), like(bias), [p.new_empty((p.numel(),)) for p in act_params]
