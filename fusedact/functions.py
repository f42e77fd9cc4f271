"""autograd.Functions over the fused ops.

Each forward saves its inputs only (x and the parameters) and each backward calls the
fused backward op, which recomputes what it needs: no intermediate tensor is kept
alive between forward and backward.
"""
from __future__ import annotations

import torch

ops = torch.ops.fusedact


class SwishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta, beta_tensor):
        ctx.beta = beta
        ctx.save_for_backward(x, beta_tensor)
        return ops.swish_forward(x, beta, beta_tensor)

    @staticmethod
    def backward(ctx, grad):
        x, beta_tensor = ctx.saved_tensors
        dx, dbeta = ops.swish_backward(grad, x, ctx.beta, beta_tensor)
        return dx, None, (dbeta if beta_tensor is not None else None)


class MishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ops.mish_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ops.mish_backward(grad, x)


class HardSwishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ops.hard_swish_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ops.hard_swish_backward(grad, x)


class AconCFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p1, p2, beta, channel_dim):
        ctx.channel_dim = channel_dim
        ctx.save_for_backward(x, p1, p2, beta)
        return ops.acon_c_forward(x, p1, p2, beta, channel_dim)

    @staticmethod
    def backward(ctx, grad):
        x, p1, p2, beta = ctx.saved_tensors
        dx, dp1, dp2, dbeta = ops.acon_c_backward(grad, x, p1, p2, beta, ctx.channel_dim)
        return dx, dp1, dp2, dbeta, None
