"""vmap rules of every fused op: one call of the fused kernel on the batched tensor,
never a loop over the batch.

- mish, hard_swish, and swish with a float or unbatched beta and x alone batched: the
  op is elementwise, so it runs on the batched x as it is.
- acon_c: the vmapped dimension is merged into the channels. x of logical shape
  (..., C, ...) batched B times becomes (..., B*C, ...), each parameter (C,) becomes
  (B*C,) (an unbatched one repeated), a per-sample beta (N, C) becomes (N, B*C). The
  kernel then computes every batch element's channels at once, and the parameter
  gradients it reduces per channel are per batch element, as vmap wants them.
- swish with a learnable beta and anything batched: per batch element the reductions
  of dbeta are separate, and a batched beta differs per element, so it runs as ACON-C
  with p1 = 1, p2 = 0 (the same function: d = 1, y = x (1 s(beta x) + 0)) over x viewed
  as (1, B, -1), one channel per batch element.
"""

from __future__ import annotations

import torch

from ._opinfo import OPS

UNARY = tuple(op.name for op in OPS if op.unary)

__all__ = ["vmap_rules"]


def _front(t: torch.Tensor, bdim, B: int) -> torch.Tensor:
    """t with its batch dimension first (expanded when t is not batched)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(B, *t.shape)


def _swish_as_acon(x, bt):
    """(x as (1, B, M), p1 = 1, p2 = 0, beta (B,)) for swish run as acon_c."""
    B = x.shape[0]
    ones = bt.new_ones((B,))
    return x.reshape(1, B, -1), ones, torch.zeros_like(ones), bt.reshape(B)


class _AconBatch:
    """The geometry of acon_c's arguments with the vmapped dimension merged into the
    channels (see the module's docstring)."""

    def __init__(self, B: int, x: torch.Tensor, xd, beta_logical_numel: int, channel_dim: int):
        self.B = B
        ndim = x.dim() - (xd is not None)
        self.c = c = channel_dim % ndim
        X = x.movedim(xd, c) if xd is not None else x.unsqueeze(c).expand(*x.shape[:c], B, *x.shape[c:])
        self.shape = X.shape  # (..., B, C, ...)
        self.C = self.shape[c + 1]
        self.per_sample = beta_logical_numel != self.C
        self.N = self.shape[0] if c > 0 else 1

    def x(self, t: torch.Tensor, bdim) -> torch.Tensor:
        c, B = self.c, self.B
        t = t.movedim(bdim, c) if bdim is not None else t.unsqueeze(c).expand(*t.shape[:c], B, *t.shape[c:])
        return t.reshape(*self.shape[:c], B * self.C, *self.shape[c + 2 :])

    def param(self, p: torch.Tensor, bdim) -> torch.Tensor:
        return _front(p, bdim, self.B).reshape(self.B * self.C)

    def beta(self, b: torch.Tensor, bdim) -> torch.Tensor:
        if not self.per_sample:
            return self.param(b, bdim)
        return _front(b, bdim, self.B).reshape(self.B, self.N, self.C).transpose(0, 1).reshape(self.N, self.B * self.C)

    def out(self, y: torch.Tensor) -> torch.Tensor:
        """y (..., B*C, ...) with the batch at self.c."""
        return y.reshape(self.shape)

    def param_grad(self, d: torch.Tensor, logical_shape) -> torch.Tensor:
        return d.reshape(self.B, *logical_shape)

    def beta_grad(self, d: torch.Tensor, logical_shape) -> torch.Tensor:
        if not self.per_sample:
            return self.param_grad(d, logical_shape)
        return d.reshape(self.N, self.B, self.C).transpose(0, 1).reshape(self.B, *logical_shape)


def _logical_shape(t: torch.Tensor, bdim) -> tuple:
    shape = list(t.shape)
    if bdim is not None:
        del shape[bdim]
    return tuple(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def vmap_rules(ops, invoke) -> dict:
    """The vmap rule of every op of the namespace ``ops``, by op name, in the signature of
    ``autograd.Function.vmap`` and ``torch.library.register_vmap``. ``invoke(ops, name,
    *args)`` calls an op: the Functions' rules run one functorch level down (there the
    ops' Functions are applied: fusedact.functions.invoke), the ops' own rules inside
    the dispatcher's batching key (there the op is called as it is)."""
    rules = {}

    def register(name):
        def add(rule):
            rules[name] = rule
            return rule

        return add

    for name in UNARY:

        def unary_forward(info, in_dims, x, op=f"{name}_forward"):
            return invoke(ops, op, x), in_dims[0]

        def unary_backward(info, in_dims, grad, x, op=f"{name}_backward"):
            gd, xd = in_dims
            if gd == xd:
                return invoke(ops, op, grad, x), xd
            return invoke(ops, op, _front(grad, gd, info.batch_size), _front(x, xd, info.batch_size)), 0

        rules[f"{name}_forward"] = unary_forward
        rules[f"{name}_backward"] = unary_backward

    @register("swish_forward")
    def swish_forward(info, in_dims, x, beta, beta_tensor):
        xd, _, btd = in_dims
        if btd is None:
            return invoke(ops, "swish_forward", x, beta, beta_tensor), xd
        X = _front(x, xd, info.batch_size)
        y = invoke(ops, "acon_c_forward", *_swish_as_acon(X, _front(beta_tensor, btd, info.batch_size)), 1)
        return y.reshape(X.shape), 0

    @register("swish_backward")
    def swish_backward(info, in_dims, grad, x, beta, beta_tensor):
        gd, xd, _, btd = in_dims
        B = info.batch_size
        if beta_tensor is None:
            if gd == xd:
                return invoke(ops, "swish_backward", grad, x, beta, None), (xd, None)
            return invoke(ops, "swish_backward", _front(grad, gd, B), _front(x, xd, B), beta, None), (0, None)
        X, G, bt = _front(x, xd, B), _front(grad, gd, B), _front(beta_tensor, btd, B)
        X3, p1, p2, b = _swish_as_acon(X, bt)
        dx, _, _, dbeta = invoke(ops, "acon_c_backward", G.reshape(X3.shape), X3, p1, p2, b, 1)
        return (dx.reshape(X.shape), dbeta.reshape(bt.shape)), (0, 0)

    @register("acon_c_forward")
    def acon_c_forward(info, in_dims, x, p1, p2, beta, channel_dim):
        xd, p1d, p2d, bd, _ = in_dims
        geo = _AconBatch(info.batch_size, x, xd, _numel(_logical_shape(beta, bd)), channel_dim)
        y = invoke(
            ops, "acon_c_forward", geo.x(x, xd), geo.param(p1, p1d), geo.param(p2, p2d), geo.beta(beta, bd), geo.c
        )
        return geo.out(y), geo.c

    @register("acon_c_backward")
    def acon_c_backward(info, in_dims, grad, x, p1, p2, beta, channel_dim):
        gd, xd, p1d, p2d, bd, _ = in_dims
        geo = _AconBatch(info.batch_size, x, xd, _numel(_logical_shape(beta, bd)), channel_dim)
        dx, dp1, dp2, dbeta = invoke(
            ops,
            "acon_c_backward",
            geo.x(grad, gd),
            geo.x(x, xd),
            geo.param(p1, p1d),
            geo.param(p2, p2d),
            geo.beta(beta, bd),
            geo.c,
        )
        return (
            geo.out(dx),
            geo.param_grad(dp1, _logical_shape(p1, p1d)),
            geo.param_grad(dp2, _logical_shape(p2, p2d)),
            geo.beta_grad(dbeta, _logical_shape(beta, bd)),
        ), (geo.c, 0, 0, 0)

    return rules
