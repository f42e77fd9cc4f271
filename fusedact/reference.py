"""Plain eager implementations, written from docs/SPEC.md; autograd by PyTorch.

These are the yardstick the kernels are tested against (evaluated in float64) and the
``backend="eager"`` of the functional API. They keep the eager memory cost: autograd
saves the intermediates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swish", "mish", "hard_swish", "acon_c", "batch_norm_act"]


def swish(x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """y = x * sigmoid(beta * x)."""
    if isinstance(beta, torch.Tensor):
        beta = beta.reshape(())
    return (x * torch.sigmoid(beta * x)).to(x.dtype)


def mish(x: torch.Tensor) -> torch.Tensor:
    """y = x * tanh(softplus(x))."""
    return x * torch.tanh(F.softplus(x))


def hard_swish(x: torch.Tensor) -> torch.Tensor:
    """y = 0 (x <= -3), x (x + 3) / 6 (-3 < x < 3), x (x >= 3).

    The zero is -0.0, as eager ``x * relu6(x + 3) / 6`` gives for finite x <= -3; for
    x >= 3 the result is x itself (no overflow of x * 6). The middle branch is fed 0
    where it is not taken, so that neither it nor its gradient can make inf or NaN
    there; the gradient at the kinks is PyTorch's: 0 at x = -3, 1 at x = 3.
    """
    outside = (x <= -3) | (x >= 3)
    xm = torch.where(outside, 0.0, x)
    return torch.where(x <= -3, -0.0, torch.where(x >= 3, x, xm * (xm + 3) / 6))


def channel_view(p: torch.Tensor, x: torch.Tensor, channel_dim: int, per_sample: bool) -> torch.Tensor:
    """p as a tensor that broadcasts against x: C at channel_dim (and N at 0)."""
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    if per_sample:
        shape[0] = x.shape[0]
    return p.reshape(shape)


def acon_c(
    x: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    beta: torch.Tensor,
    *,
    channel_dim: int = 1,
) -> torch.Tensor:
    """ACON-C: d = p1 - p2, y = d x sigmoid(beta d x) + p2 x, per channel.

    beta has C elements (ACON-C) or N * C (Meta-ACON, one per sample and channel).
    Evaluated as x (d sigmoid(beta d x) + p2), the same value, which stays finite (and
    is +-inf at x = +-inf) where d x overflows and (d x) s + p2 x would give inf - inf.
    """
    cd = channel_dim % x.dim()
    per_sample = beta.numel() != x.shape[cd]  # N * C values: one per (sample, channel)
    p1 = channel_view(p1, x, cd, False)
    p2 = channel_view(p2, x, cd, False)
    beta = channel_view(beta, x, cd, per_sample)
    d = p1 - p2
    return (x * (d * torch.sigmoid(beta * (d * x)) + p2)).to(x.dtype)


def activation(z: torch.Tensor, act: str, beta: float = 1.0, p1=None, p2=None, act_beta=None) -> torch.Tensor:
    """batch_norm_act's activation of z (N, C, ...) by name; act_beta: swish's tensor beta
    or acon_c's beta."""
    if act == "identity":
        return z
    if act == "swish":
        return swish(z, beta if act_beta is None else act_beta)
    if act == "acon_c":
        return acon_c(
            z,
            p1.reshape(-1),
            p2.reshape(-1),
            act_beta.reshape(-1) if act_beta.numel() == z.shape[1] else act_beta.reshape(z.shape[0], z.shape[1]),
            channel_dim=1,
        )
    return {"mish": mish, "hard_swish": hard_swish}[act](z)


def batch_norm_act(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    act="swish",
    *act_params,
) -> torch.Tensor:
    """F.batch_norm (updating the running statistics in training, as nn.BatchNorm2d) then
    the activation: fusedact.batch_norm_act's eager form."""
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return activation(z, act, *split_act_params(act, act_params))


def split_act_params(act: str, act_params: tuple) -> tuple:
    """batch_norm_act's ``*act_params`` as (beta, p1, p2, act_beta): swish's float beta
    (1.0 when absent) or tensor beta (act_beta), acon_c's p1, p2 and beta (act_beta)."""
    if act == "acon_c":
        p1, p2, act_beta = act_params
        return 1.0, p1, p2, act_beta
    if act == "swish" and act_params:
        b = act_params[0]
        return (1.0, None, None, b) if isinstance(b, torch.Tensor) else (float(b), None, None, None)
    return 1.0, None, None, None
