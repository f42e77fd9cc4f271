"""autograd.Functions over the fused ops.

Each forward saves its inputs only (x and the parameters) and each backward calls the
fused backward op, which recomputes what it needs: no intermediate tensor is kept
alive between forward and backward.

Second derivatives (``create_graph=True``, e.g. a gradient penalty): the first backward
still runs the fused backward op, wrapped in ``FusedBackward``, a Function of
(grad, x, params) whose own backward is the vector-Jacobian product of the eager
reference's first derivatives, taken with ``torch.func`` (partial derivatives, so a
parameter computed from x, as in Meta-ACON, is handled) and differentiable again, so
every higher order works too. Without ``create_graph`` the plain op runs and nothing
more is recorded.

The same Functions serve every backend whose ops have the native schemas
(torch.ops.fusedact for the C++/CUDA kernels, torch.ops.fusedact_triton for Triton):
``make_functions(ops)`` builds them over one such op namespace.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from . import reference


def _reference_second_order(ref: Callable, grad: torch.Tensor, primals: tuple, cotangents: tuple) -> tuple:
    """The VJP, at ``cotangents``, of first(grad, *primals) = the VJP of ``ref`` at
    ``primals`` with ``grad``: the gradients of (grad, *primals) in a double backward."""

    def first(g, *p):
        _, vjp = torch.func.vjp(ref, *p)
        return vjp(g)

    _, vjp = torch.func.vjp(first, grad, *primals)
    return vjp(tuple(cotangents))


class FusedBackward(torch.autograd.Function):
    """``fused(grad, x, *params) -> (dx, *dparams)`` as a differentiable function:
    forward runs the fused op; backward (the second derivative) follows ``ref(x, *params)``,
    the eager reference of the same forward."""

    @staticmethod
    def forward(ctx, fused, ref, grad, x, *params):
        ctx.ref = ref
        ctx.save_for_backward(grad, x, *params)
        return tuple(fused(grad, x, *params))

    @staticmethod
    def backward(ctx, *cotangents):
        grad, x, *params = ctx.saved_tensors
        return (None, None, *_reference_second_order(ctx.ref, grad, (x, *params), cotangents))


def _first_backward(fused: Callable, ref: Callable, grad: torch.Tensor, x: torch.Tensor, *params) -> tuple:
    """(dx, *dparams) from the fused op; recorded for a second derivative only when the
    backward itself is differentiated (grad mode is on in a backward only with
    create_graph=True)."""
    if torch.is_grad_enabled():
        return FusedBackward.apply(fused, ref, grad, x, *params)
    return tuple(fused(grad, x, *params))


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
            beta = ctx.beta
            if beta_tensor is None:
                (dx,) = _first_backward(lambda g, x: ops.swish_backward(g, x, beta, None)[:1],
                                        lambda x: reference.swish(x, beta), grad, x)
                return dx, None, None
            dx, dbeta = _first_backward(lambda g, x, b: ops.swish_backward(g, x, beta, b),
                                        reference.swish, grad, x, beta_tensor)
            return dx, None, dbeta

    def unary(name: str):
        forward_op, backward_op = getattr(ops, f"{name}_forward"), getattr(ops, f"{name}_backward")
        ref = getattr(reference, name)

        def fused(g, x):
            return (backward_op(g, x),)

        class UnaryFunction(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return forward_op(x)

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensors
                (dx,) = _first_backward(fused, ref, grad, x)
                return dx

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
            cd = ctx.channel_dim
            dx, dp1, dp2, dbeta = _first_backward(
                lambda g, x, p1, p2, b: ops.acon_c_backward(g, x, p1, p2, b, cd),
                lambda x, p1, p2, b: reference.acon_c(x, p1, p2, b, channel_dim=cd),
                grad, x, p1, p2, beta)
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
