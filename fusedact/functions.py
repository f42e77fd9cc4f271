"""autograd.Functions over the fused ops.

Each forward saves its inputs only (x and the parameters) and each backward calls the
fused backward op, which recomputes what it needs: no intermediate tensor is kept
alive between forward and backward.

The same Functions serve every backend whose ops have the native schemas
(torch.ops.fusedact for the C++/CUDA kernels, torch.ops.fusedact_triton for Triton):
``make_functions(ops)`` builds them over one such op namespace.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch


def make_functions(ops, prefix: str = "") -> SimpleNamespace:
    """SwishFunction, MishFunction, HardSwishFunction and AconCFunction over ``ops``."""

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

    def unary(name: str):
        forward_op, backward_op = getattr(ops, f"{name}_forward"), getattr(ops, f"{name}_backward")

        class UnaryFunction(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return forward_op(x)

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensors
                return backward_op(grad, x)

        return UnaryFunction

    MishFunction = unary("mish")
    MishFunction.__name__ = "MishFunction"
    HardSwishFunction = unary("hard_swish")
    HardSwishFunction.__name__ = "HardSwishFunction"

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

    classes = (SwishFunction, MishFunction, HardSwishFunction, AconCFunction)
    for cls in classes:
        cls.__name__ = cls.__qualname__ = prefix + cls.__name__
        cls.__module__ = __name__
    return SimpleNamespace(**{cls.__name__[len(prefix):]: cls for cls in classes})


_native = make_functions(torch.ops.fusedact)
SwishFunction = _native.SwishFunction
MishFunction = _native.MishFunction
HardSwishFunction = _native.HardSwishFunction
AconCFunction = _native.AconCFunction
