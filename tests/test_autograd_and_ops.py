"""gradcheck in float64, opcheck of every op, torch.compile, determinism, saved tensors."""

from __future__ import annotations

import pytest
import torch

import fusedact
from conftest import DEVICES, FUSED_BACKENDS, make_layout
from fusedact._opinfo import OPS
from helpers import make_params, op_fn, rand_x

OPS_BY_BACKEND = {"native": "fusedact", "triton": "fusedact_triton"}


def ops_of(backend: str):
    return getattr(torch.ops, OPS_BY_BACKEND[backend])


def away_from_kinks(x: torch.Tensor) -> torch.Tensor:
    """hard_swish has kinks at +-3: keep finite differences off them."""
    near = (x.abs() - 3).abs() < 1e-2
    return torch.where(near, x + 0.05, x)


# (op name, GradcheckCase): every entry's cases, fusedact/_opinfo.py
GRADCHECK_CASES = [(op.name, case) for op in OPS for case in op.gradcheck]


def gradcheck_case(case, device, backend, shape4=(2, 3, 4, 5), shape3=(3, 4, 5)):
    """(fn, inputs) for one GRADCHECK_CASES row: float64, off the kinks."""
    op, c = case
    shape = shape4 if c.channel_dim == 1 else shape3
    x = make_layout(away_from_kinks(rand_x(shape, torch.float64, device, scale=2.0)), c.layout)
    params = make_params(
        op,
        x,
        channel_dim=c.channel_dim,
        per_sample=c.per_sample,
        module_layout=c.module_layout,
        learnable_beta=c.learnable,
    )
    inputs = [x.detach().requires_grad_()] + [
        p.detach().requires_grad_() for p in params if isinstance(p, torch.Tensor)
    ]
    fixed = [p for p in params if not isinstance(p, torch.Tensor)]
    f = op_fn(op, backend, c.channel_dim)
    fn = lambda x, *tensors: f(x, *tensors, *fixed)  # noqa: E731
    return fn, tuple(inputs)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c.name for _, c in GRADCHECK_CASES])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gradcheck(device, case, backend):
    fn, inputs = gradcheck_case(case, device, backend)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c.name for _, c in GRADCHECK_CASES])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gradgradcheck(device, case, backend):
    """Second derivatives of every op and parameter: the analytic double backward against
    finite differences of the fused first backward (which it differentiates)."""
    fn, inputs = gradcheck_case(case, device, backend, shape4=(2, 3, 2, 3), shape3=(3, 2, 3))
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("op", ["swish", "mish", "hard_swish", "acon_c"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_first_backward_stays_fused_under_create_graph(op, device, backend):
    """With create_graph=True the first-order gradients are the fused backward op's
    output, bit for bit; without it, they carry no graph."""
    x = rand_x((2, 4, 5, 3), torch.float32, device).requires_grad_()
    params = [p.requires_grad_() for p in make_params(op, x, per_sample=(op == "acon_c"))]
    g = rand_x(x.shape, torch.float32, device, seed=5)
    y = getattr(fusedact, op)(x, *params, backend=backend)
    graphed = torch.autograd.grad(y, [x] + params, g, create_graph=True)
    plain = torch.autograd.grad(y, [x] + params, g)
    ops = ops_of(backend)
    detached = [p.detach() for p in params]
    if op == "swish":
        direct = ops.swish_backward(g, x.detach(), 1.0, *detached)
    elif op == "acon_c":
        direct = ops.acon_c_backward(g, x.detach(), *detached, 1)
    else:
        direct = getattr(ops, f"{op}_backward")(g, x.detach())
    direct = [direct] if isinstance(direct, torch.Tensor) else list(direct)
    for a, b, c in zip(graphed, plain, direct):
        assert torch.equal(a, c) and torch.equal(b, c)
        assert a.requires_grad and not b.requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gradient_penalty_matches_eager(device, backend):
    """A WGAN-GP-style penalty, ||d out / d x||^2, trained through: its parameter
    gradients (second derivatives through every module) match the eager modules'."""
    torch.manual_seed(0)
    from torch import nn

    def model(b):
        return (
            nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                fusedact.nn.AconC(8, backend=b),
                nn.Conv2d(8, 8, 3, padding=1),
                fusedact.nn.MetaAconC(8, r=4, backend=b),
                fusedact.nn.Swish(1.3, learnable=True, backend=b),
                fusedact.nn.Mish(backend=b),
                fusedact.nn.HardSwish(backend=b),
                nn.Conv2d(8, 1, 3),
            )
            .double()
            .to(device)
        )

    fused, eager = model(backend), model("eager")
    eager.load_state_dict(fused.state_dict())
    x = rand_x((4, 3, 6, 6), torch.float64, device, scale=1.0)
    grads = []
    for m in (fused, eager):
        xi = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(m(xi).sum(), xi, create_graph=True)
        penalty = (dx.flatten(1).norm(dim=1) - 1).pow(2).mean()
        # the last bias does not reach dx: its gradient is None for both
        grads.append(torch.autograd.grad(penalty, list(m.parameters()), allow_unused=True))
    assert sum(a is not None for a in grads[0]) == len(grads[0]) - 1
    for (name, _), a, b in zip(fused.named_parameters(), *grads):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        # float64 throughout: each op is within a few eps64 (2.2e-16) of the reference, and
        # a few layers of convolutions amplify that by far less than the 1e7 this allows;
        # a wrong second-derivative term is off by O(1).
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def _op_samples(device, ops):
    """(op overload, args) for every op, in several layouts and dtypes."""
    samples = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for layout in ("contiguous", "channels_last", "strided"):
            x = make_layout(rand_x((2, 3, 5, 4), dtype, device), layout)
            g = rand_x(x.shape, dtype, device, seed=3)
            beta = torch.tensor(1.3, dtype=dtype, device=device)
            samples += [
                (ops.swish_forward.default, (x, 1.5, None)),
                (ops.swish_forward.default, (x, 1.0, beta)),
                (ops.swish_backward.default, (g, x, 1.5, None)),
                (ops.swish_backward.default, (g, x, 1.0, beta)),
                (ops.mish_forward.default, (x,)),
                (ops.mish_backward.default, (g, x)),
                (ops.hard_swish_forward.default, (x,)),
                (ops.hard_swish_backward.default, (g, x)),
            ]
            for per_sample in (False, True):
                p1, p2, b = make_params("acon_c", x, per_sample=per_sample, module_layout=per_sample)
                samples += [
                    (ops.acon_c_forward.default, (x, p1, p2, b, 1)),
                    (ops.acon_c_backward.default, (g, x, p1, p2, b, 1)),
                ]
    return samples


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_opcheck_every_op(device, backend):
    """torch.library.opcheck: schema, fake (meta) implementation against the real one,
    and AOT dispatch with dynamic shapes, for every op."""
    seen = set()
    for op, args in _op_samples(device, ops_of(backend)):
        torch.library.opcheck(op, args)
        seen.add(op.name())
    assert len(seen) == 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    """All four ops in one compiled function, forward and backward, no graph break, and
    the compiled graph computes the same function as eager. In float64: compiled and eager
    reduce the parameter gradients in another order and Inductor evaluates the
    decompositions with its own roundings, so in float32 they differ by the bound of a
    float32 sum (test_inductor.py holds each op to it); float64 shows the math equal to
    the default 1e-7 with room for nothing else."""
    torch._dynamo.reset()
    x = rand_x((2, 8, 6, 6), torch.float64, device)
    p1, p2, b = make_params("acon_c", x, per_sample=True)
    beta = torch.tensor(1.2, dtype=torch.float64, device=device)

    def f(x, p1, p2, b, beta):
        h = fusedact.swish(x, beta, backend=backend) + fusedact.mish(x, backend=backend) * fusedact.hard_swish(
            x, backend=backend
        )
        return fusedact.acon_c(h, p1, p2, b, backend=backend)

    leaves = [t.detach().requires_grad_() for t in (x, p1, p2, b, beta)]
    leaves_c = [t.detach().clone().requires_grad_() for t in leaves]
    # Inductor compiles Triton kernels for GPUs; the interpreter's CPU run is traced with
    # AOT autograd and run eagerly instead (still one graph, no break).
    compiler = "aot_eager" if (backend == "triton" and device == "cpu") else "inductor"
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    y, yc = f(*leaves), compiled(*leaves_c)
    torch.testing.assert_close(yc, y)
    g = torch.randn_like(y)
    for a, c in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(yc, leaves_c, g)):
        torch.testing.assert_close(c, a)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_acon_c_parameter_grads_bitwise_deterministic(device, layout, backend):
    """Same inputs, same parameter gradients, bit for bit: every run and (on the CPU)
    every thread count."""
    x = make_layout(rand_x((8, 32, 40, 40), torch.float32, device), layout)
    params = make_params("acon_c", x, per_sample=True)
    g = rand_x(x.shape, torch.float32, device, seed=4)
    runs = []
    threads = [1, 2, torch.get_num_threads()] if device == "cpu" else [None] * 3
    before = torch.get_num_threads()
    try:
        for n in threads:
            if n:
                torch.set_num_threads(n)
            runs.append(ops_of(backend).acon_c_backward(g, x, *params, 1))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


class _Recorder:
    def __init__(self):
        self.saved = []

    def pack(self, t):
        self.saved.append(t)
        return t

    @staticmethod
    def unpack(t):
        return t


@pytest.mark.parametrize("op", ["swish", "mish", "hard_swish", "acon_c"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_saves_only_inputs(op, backend):
    """The autograd graph keeps x and the parameters, nothing computed."""
    x = rand_x((2, 4, 6, 6), torch.float32, "cpu").requires_grad_()
    params = [p.requires_grad_() for p in make_params(op, x)]
    rec = _Recorder()
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
        y = getattr(fusedact, op)(x, *params, backend=backend)
    inputs = [x] + params
    assert len(rec.saved) == len(inputs)
    for saved in rec.saved:
        assert any(saved is t or (saved.data_ptr() == t.data_ptr() and saved.shape == t.shape) for t in inputs)
    y.sum().backward()  # and the backward works from them


def test_eager_module_saves_more():
    """The eager ACON-C keeps intermediates alive; the saving is real."""
    x = rand_x((2, 4, 6, 6), torch.float32, "cpu").requires_grad_()
    params = [p.requires_grad_() for p in make_params("acon_c", x)]
    rec = _Recorder()
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
        fusedact.acon_c(x, *params, backend="eager")
    assert sum(t.numel() for t in rec.saved) > 2 * x.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_second_backward_does_not_corrupt(device, backend):
    """The backward never writes into a saved input (Liger's SwiGLU did)."""
    x = rand_x((3, 5, 7, 7), torch.float32, device).requires_grad_()
    params = [p.requires_grad_() for p in make_params("acon_c", x)]
    y = fusedact.acon_c(x, *params, backend=backend)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, [x] + params, g, retain_graph=True)
    second = torch.autograd.grad(y, [x] + params, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["swish", "mish", "acon_c"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_third_derivative_matches_reference(op, backend):
    """The double backward is itself differentiable: d3/dx3 (summed) in float64 equals
    the eager reference's. (hard_swish's second derivative is piecewise constant: its
    third is not defined by autograd in either.)"""
    from fusedact import reference

    x = rand_x((2, 3, 4, 5), torch.float64, "cpu", scale=2.0)
    params = make_params(op, x)
    results = []
    for f in (lambda *a: getattr(fusedact, op)(*a, backend=backend), getattr(reference, op)):
        xi = x.clone().requires_grad_()
        (d1,) = torch.autograd.grad(f(xi, *params).sum(), xi, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), xi, create_graph=True)
        (d3,) = torch.autograd.grad(d2.sum(), xi)
        results.append(d3)
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-12)
