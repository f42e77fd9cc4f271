"""Fake (meta) implementations of every fused op, forward and backward, so that
torch.compile traces them without running them and without graph breaks. Each checks
what the C++ op checks and returns outputs with the shapes, dtypes and strides the
real op returns."""
from __future__ import annotations

import torch
from torch.library import register_fake

from .checks import check_acon_args, check_float_beta, check_grad, check_swish_beta, check_x


def dense_like(x: torch.Tensor) -> torch.Tensor:
    """What the kernels write to: x's layout when x is one dense block, else a dense
    copy in x's suggested memory format (channels_last or contiguous)."""
    return torch.empty_like(x)


def acon_out(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    # Per-sample beta needs each sample to be one block (dim 0 outermost); other
    # layouts are computed in a contiguous copy.
    N = x.shape[0] if per_sample else 1
    out = dense_like(x)
    if N > 1 and x.numel() > 0 and out.stride(0) * N != x.numel():
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out


def param_grad(p: torch.Tensor) -> torch.Tensor:
    return p.new_empty(p.shape)


@register_fake("fusedact::swish_forward")
def _swish_forward(x, beta, beta_tensor):
    check_x("fusedact.swish", x)
    if beta_tensor is not None:
        check_swish_beta("fusedact.swish", beta_tensor, x)
    else:
        check_float_beta("fusedact.swish", beta, x)
    return dense_like(x)


@register_fake("fusedact::swish_backward")
def _swish_backward(grad, x, beta, beta_tensor):
    check_x("fusedact.swish_backward", x)
    check_grad("fusedact.swish_backward", grad, x)
    if beta_tensor is None:
        check_float_beta("fusedact.swish_backward", beta, x)
        return dense_like(x), x.new_empty((0,))
    check_swish_beta("fusedact.swish_backward", beta_tensor, x)
    return dense_like(x), param_grad(beta_tensor)


def _register_unary(name: str) -> None:
    @register_fake(f"fusedact::{name}_forward")
    def _forward(x):
        check_x(f"fusedact.{name}", x)
        return dense_like(x)

    @register_fake(f"fusedact::{name}_backward")
    def _backward(grad, x):
        check_x(f"fusedact.{name}_backward", x)
        check_grad(f"fusedact.{name}_backward", grad, x)
        return dense_like(x)


_register_unary("mish")
_register_unary("hard_swish")


@register_fake("fusedact::acon_c_forward")
def _acon_c_forward(x, p1, p2, beta, channel_dim):
    _, per_sample = check_acon_args("fusedact.acon_c", x, p1, p2, beta, channel_dim)
    return acon_out(x, per_sample)


@register_fake("fusedact::acon_c_backward")
def _acon_c_backward(grad, x, p1, p2, beta, channel_dim):
    op = "fusedact.acon_c_backward"
    _, per_sample = check_acon_args(op, x, p1, p2, beta, channel_dim)
    check_grad(op, grad, x)
    return acon_out(x, per_sample), param_grad(p1), param_grad(p2), param_grad(beta)
