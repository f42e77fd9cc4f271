"""Inputs and checks shared by the test modules: how to call each op, its float64
reference result, and the comparison with the tolerance table."""
from __future__ import annotations

import torch

import fusedact
from fusedact import reference

from conftest import TOL, is_dense, reduction_tol


def op_fn(op: str, backend: str | None = None, channel_dim: int = 1):
    """f(x, *params) for op through the functional API."""
    if op == "swish":
        return lambda x, beta=1.7: fusedact.swish(x, beta, backend=backend)
    if op == "acon_c":
        return lambda x, p1, p2, beta: fusedact.acon_c(x, p1, p2, beta, channel_dim=channel_dim, backend=backend)
    return getattr(fusedact, op) if backend is None else (lambda x: getattr(fusedact, op)(x, backend=backend))


def ref_fn(op: str, channel_dim: int = 1):
    if op == "swish":
        return lambda x, beta=1.7: reference.swish(x, beta)
    if op == "acon_c":
        return lambda x, p1, p2, beta: reference.acon_c(x, p1, p2, beta, channel_dim=channel_dim)
    return getattr(reference, op)


def make_params(op, x, *, channel_dim=1, per_sample=False, module_layout=False, param_dtype=None,
                learnable_beta=True, seed=1):
    """The parameters of op for x (empty list for mish, hard_swish)."""
    gen = torch.Generator().manual_seed(seed)
    pd = param_dtype or x.dtype

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale + offset).to(pd).to(x.device)

    if op == "swish":
        return [rnd(scale=0.3, offset=1.2).reshape(())] if learnable_beta else [1.7]
    if op != "acon_c":
        return []
    cd = channel_dim % x.dim()
    C = x.shape[cd]
    shape = [C]
    if module_layout:
        shape = [1] * x.dim()
        shape[cd] = C
    p1, p2 = rnd(*shape), rnd(*shape)
    if per_sample:
        bshape = [x.shape[0], C] if not module_layout else [x.shape[0] if d == 0 else (C if d == cd else 1) for d in range(x.dim())]
        beta = rnd(*bshape, scale=0.5, offset=1.0)
    else:
        beta = rnd(*shape, scale=0.5, offset=1.0)
    return [p1, p2, beta]


def every_module_cnn(backend, c_in: int = 3, width: int = 8, r: int = 4):
    """Convolutions with every fusedact module between them (float32, CPU); callers add a head."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(c_in, width, 3, padding=1), fusedact.nn.AconC(width, backend=backend),
        nn.Conv2d(width, width, 3, padding=1), fusedact.nn.MetaAconC(width, r=r, backend=backend),
        fusedact.nn.Swish(1.3, learnable=True, backend=backend), fusedact.nn.Mish(backend=backend),
        fusedact.nn.HardSwish(backend=backend),
    )


def rand_x(shape, dtype, device, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def to64(t):
    return t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t


def param_terms_abs(op, x64, g64, params64, channel_dim):
    """Per parameter value, the sum over the elements it touches of the magnitudes of
    the factors of g * dy/dp (SPEC.md's derivatives): the scale of its rounding error.
    It equals sum |g dy/dp| except where a factor such as 1 + beta u (1 - s) crosses
    zero, where the error is relative to its parts, not to their sum. Each is scaled by
    1 + |z|, z the sigmoid's argument: z itself carries a few ulp of rounding (beta *
    (p1 - p2) * x), which s(z) and 1 - s(z) turn into a relative error up to |z| times
    larger (d ln s / d ln z = z (1 - s)), in any float32 evaluation, eager's included."""
    with torch.no_grad():
        if op == "swish":
            b = params64[0]
            z = b * x64
            s = torch.sigmoid(z)
            t = (g64 * x64 * x64).abs() * (s * torch.sigmoid(-z) * (1 + z.abs()) + 1)
            return [t.sum().reshape(b.shape)]
        cd = channel_dim % x64.dim()
        p1, p2, beta = params64
        per_sample = beta.numel() != x64.shape[cd]
        v1 = reference.channel_view(p1, x64, cd, False)
        v2 = reference.channel_view(p2, x64, cd, False)
        vb = reference.channel_view(beta, x64, cd, per_sample)
        u = (v1 - v2) * x64
        bu = vb * u
        s = torch.sigmoid(bu)
        sc = torch.sigmoid(-bu)
        gx = (g64 * x64).abs()
        cond = 1 + bu.abs()
        terms = [gx * s * (1 + (bu * sc).abs()), gx * sc * (1 + (bu * s).abs()), (g64 * u * u * s * sc).abs()]
        # + the parts the float64 reference subtracts: x - x h for p1, p2, and
        # s (1 - s) with 1 - s off by a float64 ulp for beta
        parts = [gx, gx, (g64 * u * u).abs()]
        terms = [t * cond + part for t, part in zip(terms, parts)]
        out = []
        for t, v, p in zip(terms, (v1, v2, vb), params64):
            dims = [d for d in range(x64.dim()) if v.shape[d] == 1 and x64.shape[d] != 1]
            out.append((t.sum(dim=dims, keepdim=True) if dims else t).reshape(p.shape))
        return out


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
    leaves = [x.detach().requires_grad_()] + [p.detach().clone().requires_grad_() for p in params if isinstance(p, torch.Tensor)]
    args = leaves + [p for p in params if not isinstance(p, torch.Tensor)]
    y = f(*args)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    per_sample = op == "acon_c" and params[2].numel() != params[0].numel()
    batch_outermost = x.numel() == 0 or x.stride(0) * x.shape[0] == x.numel()
    if is_dense(x) and (batch_outermost or not per_sample):
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


def outputs_and_grads(model, x, *, with_x=True, autocast_dtype=None):
    """[output, dx (when with_x), d every parameter] of a model for a fixed cotangent (a
    ramp from -1 to 1), the forward under torch.autocast when autocast_dtype is given."""
    x = x.detach().clone().requires_grad_(with_x)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        y = model(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64, device=y.device).reshape(y.shape).to(y.dtype)
    return [y] + list(torch.autograd.grad(y, ([x] if with_x else []) + list(model.parameters()), g))


def check_no_less_accurate(named, slack):
    """For each (name, actual, baseline, truth64): the relative error (2-norm) of actual
    against the float64 truth is at most twice the baseline's, plus ``slack``."""
    for name, actual, baseline, truth in named:
        scale = truth.norm().clamp_min(1e-30)
        err = ((actual.double() - truth).norm() / scale).item()
        err_baseline = ((baseline.double() - truth).norm() / scale).item()
        assert err <= 2 * err_baseline + slack, f"{name}: relative error {err:.3g}, baseline's {err_baseline:.3g}"
