"""torch.func through the fused ops: grad, vjp, jacrev, vmap (any in_dims, nested),
jvp/jacfwd, hessian, functional_call and per-sample gradients, each equal to the same
code on the eager reference. float64 throughout: each op is a few eps64 from the
reference, so 1e-12 catches any wrong term (an error is O(1))."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fusedact
from conftest import FUSED_BACKENDS
from helpers import every_module_cnn, make_params, rand_x

TIGHT = dict(rtol=1e-10, atol=1e-12)

# (id, op, per_sample, channel_dim)
CASES = [
    ("swish-float", "swish", False, 1),
    ("swish-learnable", "swish", False, 1),
    ("mish", "mish", False, 1),
    ("hard_swish", "hard_swish", False, 1),
    ("acon_c", "acon_c", False, 1),
    ("acon_c-per-sample", "acon_c", True, 1),
    ("acon_c-nlc", "acon_c", False, -1),
]


def case_inputs(case, shape=(3, 4, 2, 3)):
    name, op, per_sample, cd = case
    x = rand_x(shape if cd == 1 else shape[:3], torch.float64, "cpu", scale=2.0)
    x = torch.where(((x.abs() - 3).abs() < 1e-2), x + 0.05, x)  # off hard_swish's kinks
    params = make_params(op, x, channel_dim=cd, per_sample=per_sample, learnable_beta=(name != "swish-float"))
    return x, [p for p in params if isinstance(p, torch.Tensor)], [p for p in params if not isinstance(p, torch.Tensor)]


def fn_pair(case, backend):
    """(fused f, eager f), each f(x, *tensor_params)."""
    name, op, per_sample, cd = case

    def make(b):
        if op == "swish":
            return (
                (lambda x: fusedact.swish(x, 1.7, backend=b))
                if name == "swish-float"
                else (lambda x, beta: fusedact.swish(x, beta, backend=b))
            )
        if op == "acon_c":
            return lambda x, p1, p2, beta: fusedact.acon_c(x, p1, p2, beta, channel_dim=cd, backend=b)
        return lambda x: getattr(fusedact, op)(x, backend=b)

    return make(backend), make("eager")


def assert_trees_close(a, b):
    fa, fb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(fa) == len(fb) and len(fa) > 0
    for u, v in zip(fa, fb):
        torch.testing.assert_close(u, v, **TIGHT)


ids = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_grad_vjp_jacrev(case, backend):
    x, params, _ = case_inputs(case)
    f, e = fn_pair(case, backend)
    argnums = tuple(range(1 + len(params)))
    for transform in (lambda g: grad(lambda *a: g(*a).sum(), argnums=argnums), lambda g: jacrev(g, argnums=argnums)):
        assert_trees_close(transform(f)(x, *params), transform(e)(x, *params))
    ct = rand_x(x.shape, torch.float64, "cpu", seed=7)
    (yf, vf), (ye, ve) = vjp(f, x, *params), vjp(e, x, *params)
    torch.testing.assert_close(yf, ye, **TIGHT)
    assert_trees_close(vf(ct), ve(ct))


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_forward_mode(case, backend):
    """jvp and jacfwd (forward mode) in x and every parameter, and hessian
    (forward over reverse) of the sum."""
    x, params, _ = case_inputs(case, shape=(2, 3, 2, 2))
    f, e = fn_pair(case, backend)
    argnums = tuple(range(1 + len(params)))
    tangents = tuple(rand_x(t.shape, torch.float64, "cpu", seed=11 + i) for i, t in enumerate((x, *params)))
    assert_trees_close(jvp(f, (x, *params), tangents), jvp(e, (x, *params), tangents))
    assert_trees_close(jacfwd(f, argnums=argnums)(x, *params), jacfwd(e, argnums=argnums)(x, *params))
    assert_trees_close(
        hessian(lambda *a: f(*a).sum(), argnums=argnums)(x, *params),
        hessian(lambda *a: e(*a).sum(), argnums=argnums)(x, *params),
    )


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_vmap_in_dims_and_nested(case, backend):
    """vmap over x alone, over x and the parameters (an ensemble), with the batch at
    another dimension, and nested, forward and gradients."""
    x, params, _ = case_inputs(case)
    f, e = fn_pair(case, backend)
    B = 3
    xs = torch.stack([x * (1 + 0.1 * i) for i in range(B)], dim=2)  # batch at dim 2
    ps = [torch.stack([p * (1 + 0.05 * i) for i in range(B)]) for p in params]  # batch at dim 0
    for in_dims, args in (
        ((2,) + (None,) * len(params), (xs, *params)),
        ((2,) + (0,) * len(params), (xs, *ps)),
        ((None,) + (0,) * len(params), (x, *ps)),
    ):
        if all(d is None for d in in_dims):
            continue
        assert_trees_close(vmap(f, in_dims=in_dims)(*args), vmap(e, in_dims=in_dims)(*args))
        g = lambda h: vmap(grad(lambda *a: h(*a).sum(), argnums=tuple(range(len(args)))), in_dims=in_dims)  # noqa: E731
        assert_trees_close(g(f)(*args), g(e)(*args))
    nested = torch.stack([xs, xs * 0.5])  # (2, ..., B at 3, ...)
    vv = lambda h: vmap(vmap(h, in_dims=(2,) + (None,) * len(params)), in_dims=(0,) + (None,) * len(params))  # noqa: E731
    assert_trees_close(vv(f)(nested, *params), vv(e)(nested, *params))


def test_vmap_runs_the_fused_kernel_once():
    """The vmap rule calls the fused op once on the whole batch, not once per element."""
    x = rand_x((5, 2, 3, 4), torch.float32, "cpu")
    p1, p2, beta = make_params("acon_c", x[0])
    calls = []
    with torch.profiler.profile() as prof:
        vmap(lambda t: fusedact.acon_c(t, p1, p2, beta))(x)
        vmap(fusedact.mish)(x)
    for event in prof.events():
        if event.name.startswith("fusedact::"):
            calls.append(event.name)
    assert calls.count("fusedact::acon_c_forward") == 1 and calls.count("fusedact::mish_forward") == 1, calls


def test_direct_op_calls_under_transforms():
    """torch.ops.fusedact.* called directly (not through the functional API) are
    differentiable and batchable too."""
    x = rand_x((3, 4, 5), torch.float64, "cpu")
    ops = torch.ops.fusedact
    from fusedact import reference

    torch.testing.assert_close(
        grad(lambda t: ops.mish_forward(t).sum())(x), grad(lambda t: reference.mish(t).sum())(x), **TIGHT
    )
    torch.testing.assert_close(vmap(ops.hard_swish_forward)(x), reference.hard_swish(x), **TIGHT)
    torch.testing.assert_close(
        jacrev(lambda t: ops.swish_forward(t, 1.3, None))(x[0]),
        jacrev(lambda t: reference.swish(t, 1.3))(x[0]),
        **TIGHT,
    )


def _direct_op(case, namespace):
    """f(x, *tensor_params) calling torch.ops.<namespace>.* directly."""
    name, op, per_sample, cd = case
    ops = getattr(torch.ops, namespace)
    if op == "swish":
        return (
            (lambda x: ops.swish_forward(x, 1.7, None))
            if name == "swish-float"
            else (lambda x, beta: ops.swish_forward(x, 1.0, beta))
        )
    if op == "acon_c":
        return lambda x, p1, p2, beta: ops.acon_c_forward(x, p1, p2, beta, cd)
    return getattr(ops, f"{op}_forward")


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_direct_op_calls_under_forward_mode(case, backend):
    """torch.ops.* called directly under torch.func's forward mode: jvp, jacfwd, and jvp
    over vjp with the parameters captured from outside the transforms (before: a functorch
    internal assert for jvp and jacfwd, a segmentation fault for jvp over vjp)."""
    x, params, _ = case_inputs(case)
    direct = _direct_op(case, "fusedact_triton" if backend == "triton" else "fusedact")
    _, eager = fn_pair(case, backend)
    t = rand_x(x.shape, torch.float64, "cpu", seed=5)
    g = rand_x(x.shape, torch.float64, "cpu", seed=6)
    for f in (direct, eager):
        assert f(x, *params).shape == x.shape
    fused_fn, eager_fn = (lambda x: direct(x, *params)), (lambda x: eager(x, *params))
    assert_trees_close(jvp(fused_fn, (x,), (t,)), jvp(eager_fn, (x,), (t,)))
    # jacfwd on a small x; a per-sample beta needs the full batch (N = 3)
    xs = x if case[2] else (x[:1, :, :1] if x.dim() == 4 else x[:1])
    assert_trees_close(jacfwd(fused_fn)(xs), jacfwd(eager_fn)(xs))

    def hvp(f):
        return jvp(lambda x: vjp(f, x)[1](g)[0], (x,), (t,))[1]

    assert_trees_close(hvp(fused_fn), hvp(eager_fn))


def _model(backend):
    torch.manual_seed(0)
    return nn.Sequential(every_module_cnn(backend, 3, 6, 2), nn.Flatten(), nn.Linear(6 * 5 * 5, 2)).double()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_per_sample_gradients_of_a_model(backend):
    """functional_call + vmap(grad(...)): per-sample gradients through every module equal
    the eager model's, and their mean is the batch gradient."""
    fused, eager = _model(backend), _model("eager")
    eager.load_state_dict(fused.state_dict())
    x = rand_x((4, 3, 5, 5), torch.float64, "cpu", scale=1.0)
    target = rand_x((4, 2), torch.float64, "cpu", seed=3)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, ti):
            return ((functional_call(model, p, (xi[None],)) - ti[None]) ** 2).sum()

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    gf, ge = per_sample(fused), per_sample(eager)
    assert set(gf) == {k for k, _ in fused.named_parameters()}
    assert_trees_close(gf, ge)
    fused.zero_grad()
    ((fused(x) - target) ** 2).sum().backward()
    for k, p in fused.named_parameters():
        torch.testing.assert_close(gf[k].sum(0), p.grad, **TIGHT)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_forward_ad_without_torch_func(case):
    """torch.autograd.forward_ad (dual tensors, no torch.func): the tangent of the
    output equals the eager one, through the functional API and the op itself."""
    import torch.autograd.forward_ad as fwAD

    x, params, _ = case_inputs(case, shape=(2, 3, 2, 2))
    f, e = fn_pair(case, "native")
    tangents = [rand_x(t.shape, torch.float64, "cpu", seed=21 + i) for i, t in enumerate((x, *params))]
    results = []
    for g in (f, e):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, d) for t, d in zip((x, *params), tangents)]
            results.append(fwAD.unpack_dual(g(*duals)).tangent)
    torch.testing.assert_close(results[0], results[1], **TIGHT)
    if case[0] == "mish":
        with fwAD.dual_level():
            out = torch.ops.fusedact.mish_forward(fwAD.make_dual(x, tangents[0]))
            torch.testing.assert_close(fwAD.unpack_dual(out).tangent, results[1], **TIGHT)


# ---- BatchNorm + activation (fusedact.nn.BatchNormAct2d) under torch.func


def _bn_pair(act, training, track=True):
    """(nn.BatchNorm2d then the eager act, the same converted), float64, with moved
    running statistics: a converted model's block against the model it came from."""
    torch.manual_seed(0)
    eager_act = {"silu": nn.SiLU, "hard_swish": nn.Hardswish, "mish": nn.Mish}[act]
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=track), eager_act())
    ref = ref.double().train(training)
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5), ref[1].bias.uniform_(-0.5, 0.5)
        if track:
            ref[1].running_mean.uniform_(-0.5, 0.5), ref[1].running_var.uniform_(0.5, 2.0)
    ours = fusedact.convert(copy.deepcopy(ref))
    assert isinstance(ours[1], fusedact.nn.BatchNormAct2d)
    return ref, ours


BN_TRANSFORMS = {
    "grad": lambda f, p, x: grad(lambda p: f(p, x).sum())(p),
    "vjp": lambda f, p, x: vjp(lambda x: f(p, x), x)[1](torch.ones_like(f(p, x))),
    "jacrev": lambda f, p, x: jacrev(lambda x: f(p, x))(x),
    "jacfwd": lambda f, p, x: jacfwd(lambda x: f(p, x))(x),
    "jvp": lambda f, p, x: jvp(lambda x: f(p, x), (x,), (torch.ones_like(x),)),
    "hessian": lambda f, p, x: hessian(lambda x: f(p, x).sum())(x[:1]),
    "vmap-x": lambda f, p, x: vmap(lambda x: f(p, x[None]))(x),
    "per-sample-grad": lambda f, p, x: vmap(grad(lambda p, x: f(p, x[None]).sum()), in_dims=(None, 0))(p, x),
    "ensemble": lambda f, p, x: vmap(lambda p: f(p, x))({k: torch.stack([v, 1.1 * v]) for k, v in p.items()}),
}


def _forward_ad(f, p, x):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return fwAD.unpack_dual(f(p, fwAD.make_dual(x, torch.ones_like(x)))).tangent


@pytest.mark.parametrize("transform", [*BN_TRANSFORMS, "forward_ad"])
@pytest.mark.parametrize("act", ["silu", "hard_swish"])
@pytest.mark.parametrize("mode", ["eval", "train-batch-stats"])
def test_batch_norm_act_under_torch_func_is_batch_norm(mode, act, transform):
    """A converted model's BatchNormAct2d under every torch.func transform and forward AD,
    in eval mode and in training without running statistics (with them PyTorch's own
    BatchNorm refuses the transforms; see the next test): the values of nn.BatchNorm2d
    then the act. (It runs F.batch_norm then the act's op there: the graph ops' generated
    Functions took no transform, and jvp gave wrong tangents.)"""
    ref, ours = _bn_pair(act, mode != "eval", track=mode == "eval")
    x = torch.randn(3, 3, 2, 3, dtype=torch.float64) * 2
    x = torch.where(((x.abs() - 3).abs() < 1e-2), x + 0.05, x)
    run = BN_TRANSFORMS.get(transform, _forward_ad)
    got, want = [
        run(lambda p, x, m=m: functional_call(m, (p, dict(m.named_buffers())), (x,)), dict(m.named_parameters()), x)
        for m in (ours, ref)
    ]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transform", ["grad", "vmap-x"])
def test_batch_norm_act_training_with_running_statistics_refuses_as_batch_norm(transform):
    """In training with running statistics (updated in place), torch.func refuses
    nn.BatchNorm2d; it refuses the converted block alike, with PyTorch's own message."""
    errors = []
    for m in _bn_pair("silu", True):
        p, x = dict(m.named_parameters()), torch.randn(3, 3, 2, 3, dtype=torch.float64)
        with pytest.raises(RuntimeError) as e:
            BN_TRANSFORMS[transform](lambda p, x, m=m: functional_call(m, (p, dict(m.named_buffers())), (x,)), p, x)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
