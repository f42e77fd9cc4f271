"""The test suite's numerics: op-level checks against a float64 evaluation of the
reference, with tolerances derived from the dtype. Used by tests/ and by
``python -m fusedact.selftest`` on an installed fusedact; the users' model-level check
is fusedact.testing.assert_parity."""

from __future__ import annotations

import math

import torch

from . import _opinfo, reference
from ._opinfo import is_dense

# Elementwise tolerance per output dtype: torch.testing's defaults. Every kernel computes
# in float32 (float64 for float64) with a few ulp of error, then rounds once: the error
# is at most 0.5 ulp of the dtype plus a few float32 ulp. That is within rtol for
# float16 (0.5 ulp = 4.9e-4 < 1e-3) and bfloat16 (3.9e-3 < 1.6e-2), and float32's
# rtol of 1.3e-6 is 11 ulp; atol covers results that cancel to near zero (the backward
# of swish at x = -1.28, acon_c where d s + p2 = 0), where the error is a few ulp of the
# terms' size rather than of the result.
TOL = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}


def opmath_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def reduction_tol(
    terms_abs_sum: torch.Tensor, n_terms: int, x_dtype: torch.dtype, p_dtype: torch.dtype, ref: torch.Tensor
) -> torch.Tensor:
    """Bound on the error of a parameter gradient: a sum of n_terms products computed in
    opmath. Each term carries a few opmath ulp (8 allowed); rounding errors in a sum
    of n terms accumulate like a random walk, ~sqrt(n) ulp of the running magnitude,
    itself at most sum|terms|; the result is then rounded once to the parameter dtype.
    The float64 reference has its own error: eager autograd forms differences such as
    x - x h that cancel in float64 too, about one float64 ulp of the parts (8 eps64).
    The final rounding is half an ulp of the result, or of the subnormal spacing
    (tiny * eps) below the normal range.
    """
    eps = opmath_eps(x_dtype)
    eps64 = torch.finfo(torch.float64).eps
    fp = torch.finfo(p_dtype)
    rounding = fp.eps * torch.maximum(ref.abs(), torch.full_like(ref, fp.tiny))
    return (eps * (8 + math.sqrt(n_terms)) + 8 * eps64) * terms_abs_sum + rounding


def op_fn(op: str, backend: str | None = None, channel_dim: int = 1):
    """f(x, *params) for op through the functional API; no params: the entry's
    ``default_params``."""
    info = _opinfo.get(op)
    fn = info.function()
    kw = {} if backend is None else {"backend": backend}
    return lambda x, *params: info.call(fn, x, params or info.default_params, channel_dim=channel_dim, **kw)


def ref_fn(op: str, channel_dim: int = 1):
    """f(x, *params) for op through fusedact.reference."""
    info = _opinfo.get(op)
    fn = getattr(reference, info.name)
    return lambda x, *params: info.call(fn, x, params or info.default_params, channel_dim=channel_dim)


def make_params(
    op, x, *, channel_dim=1, per_sample=False, module_layout=False, param_dtype=None, learnable_beta=True, seed=1
):
    """The parameters of op for x (empty list for mish, hard_swish): fusedact/_opinfo.py."""
    return _opinfo.sample_params(
        op,
        x,
        channel_dim=channel_dim,
        per_sample=per_sample,
        module_layout=module_layout,
        param_dtype=param_dtype,
        learnable_beta=learnable_beta,
        seed=seed,
    )


def rand_x(shape, dtype, device, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def to64(t):
    return t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t


def param_terms_abs(op, x64, g64, params64, channel_dim):
    """Per parameter value, the sum over the elements it touches of the magnitudes of
    the factors of g * dy/dp (docs/SPEC.md's derivatives): the scale of its rounding error.
    It equals sum |g dy/dp| except where a factor such as 1 + beta u (1 - s) crosses
    zero, where the error is relative to its parts, not to their sum. Each is scaled by
    1 + |z|, z the sigmoid's argument: z itself carries a few ulp of rounding (beta *
    (p1 - p2) * x), which s(z) and 1 - s(z) turn into a relative error up to |z| times
    larger (d ln s / d ln z = z (1 - s)), in any float32 evaluation, eager's included.
    Each op's own is its registry entry's ``param_error_scale``."""
    with torch.no_grad():
        return _opinfo.get(op).param_error_scale(x64, g64, params64, channel_dim)


def check_close(actual, ref64, eager=None):
    """actual against the float64 reference: the table tolerance of actual's dtype, and
    (where the eager result in that dtype is given) at most twice eager's own error."""
    dtype = actual.dtype
    assert ref64.dtype == torch.float64
    torch.testing.assert_close(actual.double(), ref64, **TOL[dtype], equal_nan=True)
    if eager is not None and actual.numel():
        err = (actual.double() - ref64).abs().nan_to_num(0, 0, 0).max()
        err_eager = (eager.double() - ref64).abs().nan_to_num(0, 0, 0).max()
        assert err <= 2 * err_eager + TOL[dtype]["atol"], f"error {err} vs eager's {err_eager}"


def check_forward_backward(op, x, params, *, channel_dim=1, backend=None, seed=2):
    """Runs op forward and backward and checks every output against float64."""
    f = op_fn(op, backend, channel_dim)
    r = ref_fn(op, channel_dim)
    # x itself (a leaf in its own layout) and copies of the tensor parameters
    leaves = [x.detach().requires_grad_()] + [
        p.detach().clone().requires_grad_() for p in params if isinstance(p, torch.Tensor)
    ]
    args = leaves + [p for p in params if not isinstance(p, torch.Tensor)]
    y = f(*args)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    info = _opinfo.get(op)
    per_sample = info.channel_dim and _opinfo.per_sample(x, params[2], channel_dim)
    if is_dense(x) and (_opinfo.batch_blocked(x) or not per_sample):
        assert y.stride() == x.stride(), "output must keep x's memory layout"
    args64 = [to64(a) for a in args]
    y64 = r(*args64)
    # eager in x's dtype, once, for its forward and backward error
    leaves_e = [a.detach().clone().requires_grad_() for a in leaves]
    y_e = r(*(leaves_e + [p for p in params if not isinstance(p, torch.Tensor)]))
    check_close(y, y64.detach(), y_e.detach())

    g = rand_x(x.shape, x.dtype, x.device, seed=seed, scale=1.0)
    grads = torch.autograd.grad(y, leaves, g)
    leaves64 = [a for a in args64 if isinstance(a, torch.Tensor)]
    grads64 = torch.autograd.grad(y64, leaves64, g.double())
    assert grads[0].dtype == x.dtype and grads[0].shape == x.shape
    grads_e = torch.autograd.grad(y_e, leaves_e, g)
    check_close(grads[0], grads64[0], grads_e[0])
    if len(leaves) > 1:
        x64 = leaves64[0].detach()
        terms = param_terms_abs(op, x64, g.double(), [p.detach() for p in leaves64[1:]], channel_dim)
        for k, (gp, gp64, p, t) in enumerate(zip(grads[1:], grads64[1:], leaves[1:], terms)):
            assert gp.dtype == p.dtype and gp.shape == p.shape, f"param {k}: {gp.dtype}{tuple(gp.shape)}"
            n_terms = max(1, x.numel() // max(1, p.numel()))
            tol = reduction_tol(t, n_terms, x.dtype, p.dtype, gp64)
            err = (gp.double() - gp64).abs()
            assert bool((err <= tol + 1e-300).all()), f"param {k}: max error {err.max()} > tol {tol.max()}"
    return y, grads
