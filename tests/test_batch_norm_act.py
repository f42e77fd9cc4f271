"""fusedact.batch_norm_act and BatchNormAct2d/1d against nn.BatchNorm2d followed by the
eager activation: y, dx, dweight, dbias, the activation's parameter gradients and the
running statistics, train and eval, every act, dtype and layout; gradcheck; the edge
cases nn.BatchNorm2d has; the modules, convert, compile, export.

The rule for 16-bit and float32 results is assert_parity's (fusedact/testing.py): per
tensor, the relative 2-norm error against a float64 evaluation is at most twice that of
PyTorch's own BatchNorm + activation in the same dtype, plus half an ulp (16-bit: the
one rounding of a float32 result) or 4 ulp (float32). It holds for the parameter
gradients too, which are sums over N*H*W: eager sums the same terms, so its error grows
with the reduction length as ours does. float64: within 1e-10 of the float64 reference.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fusedact
from conftest import DEVICES, FUSED_BACKENDS, HAS_CUDA, TRITON_INTERPRET, make_layout
from fusedact.testing import relative_error, slack_for
from helpers import at_a_page_end, same_bits

ACT_CASES = [  # (id, act, builder of act_params(x) in float32 for 16-bit x)
    ("identity", "identity", lambda x, C, pd: ()),
    ("silu", "swish", lambda x, C, pd: ()),
    ("swish-float", "swish", lambda x, C, pd: (1.7,)),
    ("swish-tensor", "swish", lambda x, C, pd: (torch.tensor([1.3], dtype=pd),)),
    ("mish", "mish", lambda x, C, pd: ()),
    ("hard_swish", "hard_swish", lambda x, C, pd: ()),
    (
        "acon_c",
        "acon_c",
        lambda x, C, pd: (torch.randn(C, dtype=pd), torch.randn(C, dtype=pd), 1 + 0.5 * torch.randn(C, dtype=pd)),
    ),
    (
        "meta_acon_c",
        "acon_c",
        lambda x, C, pd: (
            torch.randn(C, dtype=pd),
            torch.randn(C, dtype=pd),
            1 + 0.5 * torch.randn(x.shape[0], C, dtype=pd),
        ),
    ),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "ncl"]
# "cuda-passes": CUDA with fusedact.config.cuda_bn_passes on (the native passes composed
# on the device); plain "cuda" takes the unfused path while it is off
BN_DEVICES = [
    *DEVICES,
    pytest.param("cuda-passes", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device or kernels")),
]


def _bn_device(device, backend, monkeypatch):
    """The torch device of a BN_DEVICES name; under "cuda-passes" the passes are switched
    on and the unfused path made to fail, so that the test shows they ran."""
    if device != "cuda-passes":
        return device
    if backend != "native":
        pytest.skip("the switch is the native backend's")
    from fusedact import batch_norm as bn

    def unfused(*args):
        raise AssertionError("cuda_bn_passes is on: the unfused path must not run")

    monkeypatch.setattr(fusedact.config, "cuda_bn_passes", True)
    monkeypatch.setattr(bn, "_unfused", unfused)
    return "cuda"


def _inputs(act_case, dtype, layout, seed=0):
    torch.manual_seed(seed)
    shape = (4, 6, 10) if layout == "ncl" else (4, 6, 5, 7)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    x = make_layout(x, "channels_last" if layout == "channels_last" else "contiguous")
    C = shape[1]
    pd = torch.float64 if dtype == torch.float64 else torch.float32  # as nn.BatchNorm2d under autocast
    w, b = 1 + 0.3 * torch.randn(C, dtype=pd), 0.2 * torch.randn(C, dtype=pd)
    rm, rv = 0.1 * torch.randn(C, dtype=pd), 1 + 0.2 * torch.rand(C, dtype=pd)
    ap = act_case[2](x, C, pd)
    return x, w, b, rm, rv, ap


def _run(f, x, w, b, ap, g):
    """f's output and the gradients of x, w, b and the tensor act params, for g."""
    leaves = [x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()]
    tparams = [p.detach().requires_grad_() if isinstance(p, torch.Tensor) else p for p in ap]
    y = f(*leaves, tparams)
    wrt = leaves + [p for p in tparams if isinstance(p, torch.Tensor)]
    return [y] + list(torch.autograd.grad(y, wrt, g))


def _fused(act, training, rm, rv, eps=1e-5, momentum=0.1, backend=None):
    kw = {} if backend is None else {"backend": backend}
    return lambda x, w, b, ap: fusedact.batch_norm_act(x, rm, rv, w, b, training, momentum, eps, act, *ap, **kw)


def _eager(act, training, rm, rv, dtype, eps=1e-5, momentum=0.1):
    """PyTorch's own: F.batch_norm then the eager activation (fusedact.reference), in x's dtype."""

    def f(x, w, b, ap):
        return fusedact.reference.batch_norm_act(x, rm, rv, w, b, training, momentum, eps, act, *ap)

    return f


def _to64(ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act_case", ACT_CASES, ids=[c[0] for c in ACT_CASES])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", BN_DEVICES)
def test_matches_batch_norm_then_activation(device, backend, act_case, dtype, layout, training, monkeypatch):
    """native on the CPU: the C++ passes (on CUDA its unfused path, or with
    cuda_bn_passes the CUDA passes); triton: the Triton passes (under the interpreter on
    the CPU)."""
    device = _bn_device(device, backend, monkeypatch)
    _, act, _ = act_case
    x, w, b, rm, rv, ap = _inputs(act_case, dtype, layout)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    rm_f, rv_f, rm_e, rv_e = rm.clone(), rv.clone(), rm.clone(), rv.clone()

    def on(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    rm_d, rv_d = on(rm_f), on(rv_f)
    fused = _run(_fused(act, training, rm_d, rv_d, backend=backend), on(x), on(w), on(b), [on(p) for p in ap], on(g))
    fused = [t.cpu() for t in fused]
    rm_f.copy_(rm_d), rv_f.copy_(rv_d)
    eager = _run(_eager(act, training, rm_e, rv_e, dtype), x, w, b, ap, g)
    truth = _run(
        _eager(act, training, rm.double().clone(), rv.double().clone(), torch.float64),
        x.double(),
        w.double(),
        b.double(),
        _to64(ap),
        g.double(),
    )
    names = ["y", "dx", "dweight", "dbias"] + [f"d{n}" for n in ("p1", "p2", "beta")[: len(fused) - 4]]
    if act == "swish" and len(fused) == 5:
        names[4] = "dbeta"
    assert fused[0].dtype == dtype and fused[0].shape == x.shape
    assert fused[0].stride() == x.stride(), "y keeps x's layout"
    act_tol = _act_param_tolerances(act, x, w, b, rm, rv, ap, g, training, truth)
    for k, (name, a, e, t) in enumerate(zip(names, fused, eager, truth)):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        if dtype == torch.float64:
            torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12, msg=name)
            continue
        err, err_eager = relative_error(a, t), relative_error(e, t)
        bound = 2 * err_eager + slack_for(dtype)
        if err <= bound:
            continue
        # the activation's parameter gradients are sums over N*H*W whose terms may cancel:
        # there eager's cascade summation can be far better than any blocked one, and the
        # bound is the suite's reduction tolerance (fusedact/_numerics.py: 8 + sqrt(n) opmath
        # ulp of sum |terms| per value, plus the final rounding)
        assert k >= 4, f"{name}: error {err:.3g} > {bound:.3g} (eager {err_eager:.3g})"
        tol = act_tol[k - 4]
        diff = (a.double() - t).abs()
        assert bool((diff <= tol).all()), f"{name}: error {diff.max():.3g} > reduction tolerance {tol.max():.3g}"
    # the running statistics, by the same rule against their float64 update
    rm64, rv64 = rm.double().clone(), rv.double().clone()
    fusedact.reference.batch_norm_act(
        x.double(), rm64, rv64, w.double(), b.double(), training, 0.1, 1e-5, act, *_to64(ap)
    )
    for name, a, e, t in (("running_mean", rm_f, rm_e, rm64), ("running_var", rv_f, rv_e, rv64)):
        err, err_eager = relative_error(a, t), relative_error(e, t)
        assert err <= 2 * err_eager + slack_for(torch.float32 if dtype != torch.float64 else dtype), name


def _act_param_tolerances(act, x, w, b, rm, rv, ap, g, training, truth):
    """reduction_tol of each activation parameter's gradient, from its terms at the float64
    BatchNorm output z (fusedact._numerics.param_terms_abs)."""
    from fusedact import _numerics

    tensors = [p for p in ap if isinstance(p, torch.Tensor)]
    if not tensors:
        return []
    z64 = torch.nn.functional.batch_norm(
        x.double(), rm.double().clone(), rv.double().clone(), w.double(), b.double(), training
    ).detach()
    p64 = [p.double().reshape(-1) if p.numel() == x.shape[1] else p.double() for p in tensors]
    if act == "swish":
        p64 = [p64[0].reshape(())]
    terms = _numerics.param_terms_abs(act, z64, g.double(), p64, 1)
    out = []
    for t, p, ref in zip(terms, tensors, truth[4:]):
        n = max(1, x.numel() // p.numel())
        out.append(_numerics.reduction_tol(t.reshape(ref.shape), n, x.dtype, p.dtype, ref.double()))
    return out


def test_the_rule_fails_on_a_sabotaged_result():
    """The parity rule above rejects a y 0.1% off (float32) and a dweight 1% off."""
    act_case = ACT_CASES[1]
    x, w, b, rm, rv, ap = _inputs(act_case, torch.float32, "contiguous")
    g = torch.randn(x.shape)
    fused = _run(_fused("swish", True, rm.clone(), rv.clone()), x, w, b, ap, g)
    eager = _run(_eager("swish", True, rm.clone(), rv.clone(), torch.float32), x, w, b, ap, g)
    truth = _run(
        _eager("swish", True, rm.double(), rv.double(), torch.float64),
        x.double(),
        w.double(),
        b.double(),
        (),
        g.double(),
    )
    for k, factor in ((0, 1.001), (2, 1.01)):
        bad = fused[k] * factor
        assert relative_error(bad, truth[k]) > 2 * relative_error(eager[k], truth[k]) + slack_for(torch.float32)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_running_statistics_follow_batch_norm_over_steps(momentum):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, momentum=momentum)
    ours = fusedact.nn.BatchNormAct2d(5, act="identity", momentum=momentum)
    ours.load_state_dict(ref.state_dict())
    for step in range(4):
        x = torch.randn(3, 5, 4, 4) * (step + 1) + step
        ref(x), ours(x)
    # float32 statistics of 48 values a channel, summed in another order than ATen's:
    # a few float32 ulp apart after 4 updates (rtol 1e-6 is 8 ulp)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
    ref.eval(), ours.eval()
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act_case", ACT_CASES, ids=[c[0] for c in ACT_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gradcheck(backend, act_case, training):
    x, w, b, rm, rv, ap = _inputs(act_case, torch.float64, "channels_last")
    x = x[:3, :, :3, :2]
    ap = [p[:3] if isinstance(p, torch.Tensor) and p.dim() == 2 else p for p in ap]
    tensors = [p for p in ap if isinstance(p, torch.Tensor)]
    floats = [p for p in ap if not isinstance(p, torch.Tensor)]

    def f(x, w, b, *tp):
        # fresh running statistics every call: the op mutates them
        return fusedact.batch_norm_act(
            x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, act_case[1], *(list(tp) or floats), backend=backend
        )

    inputs = [t.detach().requires_grad_() for t in (x, w, b, *tensors)]
    if backend == "triton":
        # the interpreter runs a launch in about a second: gradcheck's fast mode (random
        # projections, a few evaluations); the second derivative is the eager form's VJP
        # for either backend, checked with native
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
        return
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-4, rtol=1e-3)


def test_one_value_per_channel_raises_as_batch_norm():
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as ours:
        fusedact.nn.BatchNormAct2d(3)(x)
    with pytest.raises(ValueError) as theirs:
        nn.BatchNorm2d(3)(x)
    assert str(ours.value) == str(theirs.value)
    fusedact.nn.BatchNormAct2d(3).eval()(x)  # inference is fine


@pytest.mark.parametrize("act_case", ["silu", "hard_swish", "acon_c", "meta_acon_c"])
@pytest.mark.parametrize("shape", [(0, 6, 5, 7), (4, 6, 0, 7), (0, 6, 10)], ids=["no-samples", "no-pixels", "ncl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_an_empty_batch_is_as_batch_norm(backend, training, shape, act_case):
    """x with no elements (a detector head's batch of no boxes): as ATen's batch_norm, an
    empty y of x's shape that stays in the graph, the running statistics untouched (the
    module still counts the batch), and zero gradients for the parameters; the kernels,
    which need a value a channel, are not called."""
    case = next(c for c in ACT_CASES if c[0] == act_case)
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.rand(C, requires_grad=True), torch.randn(C, requires_grad=True)
    ap = [p.requires_grad_() for p in case[2](torch.empty(max(shape[0], 1), C), C, torch.float32)]
    if act_case == "meta_acon_c":
        ap[2] = ap[2][: shape[0]]  # beta per sample: N * C = 0 values
    runs = []
    for f in (fusedact.batch_norm_act, fusedact.reference.batch_norm_act):
        rm, rv = torch.randn(C), torch.rand(C) + 0.5
        before = rm.clone(), rv.clone()
        kw = {"backend": backend} if f is fusedact.batch_norm_act else {}
        y = f(x, rm, rv, w, b, training, 0.1, 1e-5, case[1], *ap, **kw)
        assert y.shape == x.shape and y.dtype == x.dtype and y.grad_fn is not None
        grads = torch.autograd.grad(y.sum(), [x, w, b, *ap], allow_unused=True)
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
        runs.append([t if t is None else t.clone() for t in grads])
    for a, e in zip(*runs):
        assert (a is None and (e is None or not e.any())) or (a.shape == e.shape and not a.any())
    module = fusedact.nn.BatchNormAct2d(C, act="swish").train(training) if len(shape) == 4 else None
    if module is not None:
        assert module(x).shape == x.shape and int(module.num_batches_tracked) == int(training)


@pytest.mark.parametrize(
    "shape, at",
    [
        ((2, 3, 4, 4), (1, 1, 2, 3)),
        # long channels (two passes over x): inside a run, and as a run's first element
        ((2, 3, 160, 128), (1, 1, 2, 3)),
        ((2, 3, 160, 128), (1, 1, 0, 0)),
    ],
    ids=["short", "long", "long-first"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_nan_and_inf_propagate_as_batch_norm(backend, value, layout, shape, at):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[at] = value
    x = make_layout(x, layout)
    ref = nn.Sequential(nn.BatchNorm2d(3), nn.SiLU())
    ours = fusedact.nn.BatchNormAct2d.from_modules(copy.deepcopy(ref[0]), fusedact.nn.Swish(backend=backend))
    a, e = ours(x), ref(x)
    assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf())
    assert torch.equal(ours.running_mean.isnan(), ref[0].running_mean.isnan())


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_saves_x_and_the_statistics_only(backend):
    """The autograd graph of one BatchNormAct2d holds x and per-channel tensors: no
    activation-sized tensor besides x (nn.BatchNorm2d + SiLU save two)."""
    x = torch.randn(4, 8, 16, 16, requires_grad=True)

    def saved(module):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            module(x)
        return sorted(sizes, reverse=True)

    ours = saved(fusedact.nn.BatchNormAct2d(8, act=fusedact.nn.Mish(backend=backend)))
    theirs = saved(nn.Sequential(nn.BatchNorm2d(8), nn.Mish()))
    assert ours[0] == x.numel() and all(n <= 8 for n in ours[1:]), ours
    assert sum(n == x.numel() for n in theirs) == 2, theirs


def test_module_state_dict_keys_and_from_modules():
    bn = nn.BatchNorm2d(4)
    ours = fusedact.nn.BatchNormAct2d.from_modules(bn, fusedact.nn.AconC(4))
    assert ours.weight is bn.weight and ours.running_mean is bn.running_mean
    assert set(ours.state_dict()) == set(bn.state_dict()) | {"act.p1", "act.p2", "act.beta"}
    plain = fusedact.nn.BatchNormAct2d(4, act="mish")
    assert set(plain.state_dict()) == set(nn.BatchNorm2d(4).state_dict())
    plain.load_state_dict(bn.state_dict())
    nn.BatchNorm2d(4).load_state_dict(plain.state_dict())
    one = fusedact.nn.BatchNormAct1d(4, act="hard_swish")
    torch.testing.assert_close(one(torch.randn(5, 4, 3)).shape, torch.Size([5, 4, 3]))
    one(torch.randn(5, 4))


def _train_step(model, x):
    model.zero_grad()
    out = model(x)
    (out.float() ** 2).mean().backward()
    return out


def test_convert_fuses_a_sequential_and_keeps_optimizer_and_keys():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Hardswish()
    )
    ref = copy.deepcopy(model)
    keys = set(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fusedact.convert(model)
    assert isinstance(model[1], fusedact.nn.BatchNormAct2d) and isinstance(model[2], nn.Identity)
    assert set(model.state_dict()) == keys
    x = torch.randn(2, 3, 9, 9)
    for _ in range(2):
        torch.testing.assert_close(_train_step(model, x), _train_step(ref, x), rtol=1e-5, atol=1e-5)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
        opt.step()
        torch.optim.SGD(ref.parameters(), lr=0.1).step()
    kept = nn.Sequential(nn.BatchNorm2d(8), nn.SiLU())
    fusedact.convert(kept, fuse_bn=False)
    assert type(kept[0]) is nn.BatchNorm2d


def _hook_guards(model, x):
    """Dynamo's guards on a module's own hook dicts: it adds them for a module whose
    forward is an instance attribute (the old convert of ultralytics' Conv: 1.4 ms of
    guards a compiled YOLO11n step against the original's 1.0)."""
    guards = []
    torch._dynamo.reset()
    torch._dynamo.optimize("eager", guard_export_fn=guards.extend)(model)(x)
    torch._dynamo.reset()
    return [g.name for g in guards if "._modules[" in g.name and g.name.endswith("hooks")]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_blocks_train_as_batch_norm_then_act(use_reentrant):
    """torch.utils.checkpoint over converted Conv-BN-act blocks (timm's
    set_grad_checkpointing): the backward runs the blocks again, so the running
    statistics move twice a step, as nn.BatchNorm2d's do; outputs, every gradient and
    the buffers after two steps equal the unconverted model's (float64: a summation
    order's ulps, far under the bound)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Hardswish()
    ).double()
    ours = fusedact.convert(copy.deepcopy(ref))
    assert type(ours[1]) is fusedact.nn.BatchNormAct2d and type(ours[4]) is fusedact.nn.BatchNormAct2d
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    results = []
    for m in (ref, ours):
        xs = x.clone().requires_grad_()
        for _ in range(2):
            y = checkpoint(m, xs, use_reentrant=use_reentrant)
            (y * y).sum().backward()
        results.append([y.detach(), xs.grad, *(p.grad for p in m.parameters()), *m.buffers()])
    assert int(ours[1].num_batches_tracked) == 4  # two steps, each forward twice
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_convert_warns_of_global_module_hooks():
    """A global module hook (register_module_forward_hook: profilers, module trackers)
    runs on every module: after convert on each BatchNormAct2d instead of the BatchNorm
    and its activation apart, so convert says so when one is registered and it fused a pair."""
    from torch.nn.modules.module import register_module_forward_hook

    def model():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedact.convert(model())  # none registered: no warning
    handle = register_module_forward_hook(lambda *a: None)
    try:
        with pytest.warns(UserWarning, match="global module hooks are registered"):
            fusedact.convert(model())
        with pytest.warns(UserWarning, match="global module hooks are registered"):
            # a lone BatchNorm's module freed, then a pair fused: by id, a new module may
            # take the freed one's and look old
            fusedact.convert(nn.Sequential(nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()), model()))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fusedact.convert(model(), fuse_bn=False)  # nothing fused: nothing to say
            # no pair to fuse: a lone BatchNorm (identity), a SiLU without one
            fusedact.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.SiLU()))
    finally:
        handle.remove()


def test_batch_norm_swapping_helpers_go_before_convert():
    """Helpers that rebuild every BatchNorm as another class (timm's freeze_batch_norm_2d
    here; torch's and timm's convert_sync_batchnorm alike) take a BatchNormAct2d, an
    nn.BatchNorm2d, and drop its act (documented: docs/integrations.md, SyncBatchNorm).
    Run first, as the docs say, the frozen BatchNorm stays and its SiLU still runs."""
    norm_act = pytest.importorskip("timm.layers.norm_act")
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU()).eval()
    with torch.no_grad():
        ref[1].running_mean.uniform_(-1, 1), ref[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    frozen = fusedact.convert(norm_act.freeze_batch_norm_2d(copy.deepcopy(ref)))
    assert type(frozen[1]).__name__ == "FrozenBatchNorm2d" and isinstance(frozen[2], fusedact.nn.Swish)
    torch.testing.assert_close(frozen(x), ref(x), rtol=1e-5, atol=1e-6)
    dropped = norm_act.freeze_batch_norm_2d(fusedact.convert(copy.deepcopy(ref)))  # the wrong order
    assert type(dropped[1]).__name__ == "FrozenBatchNorm2d" and type(dropped[2]) is nn.Identity
    assert dropped(x).min() < -0.28  # under SiLU's minimum, -0.2785: no SiLU ran


def test_convert_fuses_ultralytics_conv_and_fuse_still_works():
    conv = pytest.importorskip("ultralytics.nn.modules.conv")
    torch.manual_seed(0)
    model = nn.Sequential(conv.Conv(3, 8, 3), conv.DWConv(8, 8, 3), conv.Conv(8, 4, 1, act=nn.Hardswish()))
    ref = copy.deepcopy(model)
    keys = set(model.state_dict())
    fusedact.convert(model)
    assert isinstance(model[0].bn, fusedact.nn.BatchNormAct2d) and isinstance(model[2].bn, fusedact.nn.BatchNormAct2d)
    assert set(model.state_dict()) == keys
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(_train_step(model, x), _train_step(ref, x), rtol=1e-5, atol=1e-5)
    # a class-level forward (a subclass of the same name), no instance one: see _hook_guards
    assert [type(m).__name__ for m in model] == ["Conv", "DWConv", "Conv"] and isinstance(model[1], conv.DWConv)
    assert not any("forward" in vars(m) for m in model)
    guards, ref_guards = _hook_guards(model, x), _hook_guards(ref, x)
    assert set(guards) <= set(ref_guards) and len(guards) <= len(ref_guards)
    assert fusedact.convert(model) is model and type(model[1]).__mro__[1] is conv.DWConv  # converts once
    copy.deepcopy(model)(x)  # EMA copies
    buf = io.BytesIO()  # ultralytics checkpoints pickle the whole model
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded] == [type(m) for m in model] == [type(m) for m in copy.deepcopy(model)]
    model.eval(), ref.eval(), loaded.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for m in model:  # ultralytics' fuse(): bn folded into conv, then act(conv(x))
        m.conv = __import__("ultralytics.utils.torch_utils", fromlist=["x"]).fuse_conv_and_bn(m.conv, m.bn)
        delattr(m, "bn")
        m.forward = m.forward_fuse
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_convert_fuses_a_lone_batch_norm_where_one_module_holds_the_pair():
    """timm's BatchNormAct2d(apply_act=False), ultralytics' Conv(act=False) and a plain
    nn.BatchNorm2d with nothing after it: the BatchNorm alone runs as batch_norm_act's
    "identity" (the same keys and numbers, fuse() still right)."""
    conv = pytest.importorskip("ultralytics.nn.modules.conv")
    timm_norm_act = pytest.importorskip("timm.layers.norm_act")
    torch.manual_seed(0)
    model = nn.Sequential(
        timm_norm_act.BatchNormAct2d(3, apply_act=False), conv.Conv(3, 8, 3, act=False), nn.BatchNorm2d(8)
    )
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    fusedact.convert(model)
    assert type(model[0]) is fusedact.nn.BatchNormAct2d and isinstance(model[1].bn, fusedact.nn.BatchNormAct2d)
    assert type(model[2]) is fusedact.nn.BatchNormAct2d and type(model[2].act) is nn.Identity
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 9, 9)
    for _ in range(2):
        torch.testing.assert_close(_train_step(model, x), _train_step(ref, x), rtol=1e-5, atol=1e-5)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(model[0].running_var, ref[0].running_var, rtol=1e-6, atol=1e-7)
    model.eval(), ref.eval()
    m = model[1]
    m.conv = __import__("ultralytics.utils.torch_utils", fromlist=["x"]).fuse_conv_and_bn(m.conv, m.bn)
    delattr(m, "bn")
    m.forward = m.forward_fuse
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


# a hook of each kind that logs its module's name when it runs
_HOOK_KINDS = {
    "forward": lambda m, log, name: m.register_forward_hook(lambda *a: log.append(name)),
    "forward_pre": lambda m, log, name: m.register_forward_pre_hook(lambda *a: log.append(name)),
    "full_backward": lambda m, log, name: m.register_full_backward_hook(lambda *a: log.append(name)),
    "state_dict": lambda m, log, name: m.register_state_dict_post_hook(lambda *a: log.append(name)),
}


@pytest.mark.parametrize("kind", list(_HOOK_KINDS))
def test_convert_leaves_a_module_with_hooks_as_it_is(kind):
    """A module with hooks is neither replaced nor fused with its neighbour (the new
    module would drop its hooks, or run them on other values), with a warning that
    names it: every hook runs as often, in the same order, and the model trains as
    before. Its neighbours without hooks still convert; an act that runs after the op's
    "identity" as its own module (timm's BatchNormAct2d around a hooked SiLU) keeps its
    hooks there."""
    conv = pytest.importorskip("ultralytics.nn.modules.conv")
    timm_norm_act = pytest.importorskip("timm.layers.norm_act")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),  # 1: hooked, before an act
        nn.SiLU(),
        nn.BatchNorm2d(8),
        nn.SiLU(),  # 4: hooked, after a BatchNorm
        nn.BatchNorm2d(8),  # 5: hooked, alone
        conv.Conv(8, 8, 1, act=nn.SiLU()),  # bn hooked (an act of its own: the default one is shared)
        conv.Conv(8, 8, 1, act=nn.SiLU()),  # act hooked
        timm_norm_act.BatchNormAct2d(8, act_layer=nn.SiLU),  # 8: hooked
        timm_norm_act.BatchNormAct2d(8, act_layer=nn.SiLU, inplace=False),  # act hooked, runs after the op
        nn.BatchNorm2d(8),  # 10, 11: no hooks, fused
        nn.Hardswish(),
    )
    hooked = [model[1], model[4], model[5], model[6].bn, model[7].act, model[8], model[9].act]
    log: list[str] = []
    for i, m in enumerate(hooked):
        _HOOK_KINDS[kind](m, log, str(i))
    ref = copy.deepcopy(model)  # its hooks log to the same list
    keys = list(model.state_dict())
    log.clear()
    with pytest.warns(UserWarning, match="has hooks") as record:
        fusedact.convert(model)
    assert sum("has hooks" in str(w.message) for w in record) == len(hooked)  # once each
    assert [type(model[i]) for i in (1, 4, 5, 8)] == [nn.BatchNorm2d, nn.SiLU, nn.BatchNorm2d, type(ref[8])]
    assert type(model[6].bn) is nn.BatchNorm2d and type(model[7].act) is nn.SiLU
    assert type(model[9]) is fusedact.nn.BatchNormAct2d and model[9].act is hooked[6]
    assert type(model[2]) is fusedact.nn.Swish and type(model[3]) is fusedact.nn.BatchNormAct2d  # their neighbours
    assert type(model[10]) is fusedact.nn.BatchNormAct2d and type(model[11]) is nn.Identity
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 9, 9)
    for _ in range(2):
        logs = []
        for m in (ref, model):
            log.clear()
            out = _train_step(m, x)
            m.state_dict()
            logs.append(list(log))
        torch.testing.assert_close(out, _train_step(ref, x), rtol=1e-5, atol=1e-5)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
        assert logs[1] == logs[0] and len(logs[0]) >= len(hooked), logs


@pytest.mark.parametrize(
    "make_act", [lambda: nn.ReLU(inplace=True), nn.GELU, lambda: nn.PReLU(6)], ids=["relu-inplace", "gelu", "prelu"]
)
def test_an_activation_outside_the_op_runs_after_its_identity(make_act):
    """BatchNormAct2d(c, act=nn.ReLU()) is nn.BatchNorm2d then that module: the
    BatchNorm in the op's "identity" (x and the statistics saved, not the BatchNorm
    output), the module after it with its own keys (act.weight of PReLU). Outputs,
    gradients (of the act's parameters too) and running statistics over steps, train
    and eval; compiled in both modes; convert_sync_batchnorm keeps the act."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.BatchNorm2d(6), make_act())
    ours = fusedact.nn.BatchNormAct2d.from_modules(copy.deepcopy(ref[0]), copy.deepcopy(ref[1]))
    assert set(ours.state_dict()) == {k.replace("0.", "", 1).replace("1.", "act.", 1) for k in ref.state_dict()}
    x = torch.randn(4, 6, 5, 7) * 2 + 0.5
    for _ in range(3):
        torch.testing.assert_close(_train_step(ours, x), _train_step(ref, x), rtol=1e-5, atol=1e-6)
        for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(ours.running_mean, ref[0].running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.running_var, ref[0].running_var, rtol=1e-6, atol=1e-7)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    ours.train(), ref.train()

    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fusedact.nn.BatchNormAct2d(6, act=nn.Identity())(x.requires_grad_())
    assert sizes.count(x.numel()) == 1, sizes  # x: no BatchNorm output saved
    x = x.detach()

    from helpers import compile_mode

    for mode in ("fuse", "kernel"):
        with compile_mode(mode):
            torch._dynamo.reset()
            c, r = copy.deepcopy(ours), copy.deepcopy(ref)
            torch.testing.assert_close(torch.compile(c, fullgraph=True)(x), r(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c.running_var, r[0].running_var, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()
    sync = fusedact.nn.SyncBatchNormAct.convert_sync_batchnorm(copy.deepcopy(ours))
    assert type(sync.act) is type(ours.act)
    torch.testing.assert_close(sync(x), copy.deepcopy(ours)(x), rtol=0, atol=0)


def test_convert_puts_a_batch_norm_before_any_activation_in_the_op():
    """A BatchNorm followed by an activation outside batch_norm_act's (ReLU, LeakyReLU)
    runs in the op's "identity", the activation after it as before: in an nn.Sequential
    (the activation module stays where it is), timm's BatchNormAct2d (its act becomes the
    BatchNormAct's, run after the op) and ultralytics' Conv (only bn is replaced; fuse()
    still right). Same keys, Parameter objects, outputs, gradients, running statistics;
    in eval with at most 64 values a channel, nn.BatchNorm2d's own numbers (F.batch_norm,
    bit for bit), above that the op's."""
    conv = pytest.importorskip("ultralytics.nn.modules.conv")
    timm_norm_act = pytest.importorskip("timm.layers.norm_act")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        timm_norm_act.BatchNormAct2d(8, act_layer=nn.ReLU),
        conv.Conv(8, 4, 1, act=nn.LeakyReLU(0.1)),
        nn.BatchNorm2d(4),
    )
    model.append(model[5])  # one module in two places stays one
    ref = copy.deepcopy(model)
    keys, params = list(model.state_dict()), list(model.parameters())
    fusedact.convert(model)
    assert type(model[1]) is fusedact.nn.BatchNormAct2d and type(model[1].act) is nn.Identity
    assert type(model[2]) is nn.ReLU
    assert type(model[3]) is fusedact.nn.BatchNormAct2d and type(model[3].act) is nn.ReLU
    assert type(model[4]).__mro__[0] is conv.Conv and type(model[4].bn) is fusedact.nn.BatchNormAct2d
    assert type(model[5]) is fusedact.nn.BatchNormAct2d and model[6] is model[5]
    assert list(model.state_dict()) == keys and all(p is q for p, q in zip(model.parameters(), params))
    x = torch.randn(2, 3, 9, 9)
    for _ in range(2):
        torch.testing.assert_close(_train_step(model, x), _train_step(ref, x), rtol=1e-5, atol=1e-5)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    for i in (1, 3):
        torch.testing.assert_close(model[i].running_var, ref[i].running_var, rtol=1e-6, atol=1e-7)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    z, bn = torch.randn(2, 4, 5, 5) * 3 + 1, model[5]
    want = nn.functional.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.equal(bn(z), want)  # eval, at most 64 values a channel: nn.BatchNorm2d's own call
    z = torch.randn(2, 4, 9, 9) * 3 + 1  # more: the op's "identity"
    want = fusedact.batch_norm_act(
        z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps, "identity"
    )
    assert torch.equal(bn(z), want)
    torch.testing.assert_close(bn(z), nn.functional.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias))
    m = model[4]
    m.conv = __import__("ultralytics.utils.torch_utils", fromlist=["x"]).fuse_conv_and_bn(m.conv, m.bn)
    delattr(m, "bn")
    m.forward = m.forward_fuse
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
    kept = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
    fusedact.convert(kept, fuse_bn=False)
    assert type(kept[0]) is nn.BatchNorm2d


@pytest.mark.parametrize("mode", ["fuse", "kernel", "auto"])
def test_compile_fullgraph_and_the_mode(mode):
    """fullgraph under inductor; "fuse" leaves no fusedact block op in the graph (Inductor
    fuses F.batch_norm and the activation), "kernel" keeps ours, "auto" follows the table."""
    from helpers import compile_mode
    from torch._inductor.utils import run_and_get_code

    from fusedact import _inductor

    torch.manual_seed(0)
    m = fusedact.nn.BatchNormAct2d(6, act="swish")
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    ref = copy.deepcopy(m)
    want = ref(x)
    with compile_mode(mode):
        torch._dynamo.reset()
        c = copy.deepcopy(m)
        y, codes = run_and_get_code(torch.compile(c, fullgraph=True), x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.running_var, ref.running_var, rtol=1e-6, atol=1e-7)
    kept = "fusedact.batch_norm_act" in "\n".join(codes)
    expect = (_inductor.AUTO_BLOCKS["cpu"]["batch_norm_act"] if mode == "auto" else mode) == "kernel"
    assert kept == expect, mode


def test_export_keeps_the_op_and_opcheck():
    m = fusedact.nn.BatchNormAct2d(6, act="mish").eval()
    x = torch.randn(2, 6, 4, 4)
    ep = torch.export.export(m, (x,))
    assert "fusedact.batch_norm_act" in str(ep.graph), ep.graph
    torch.testing.assert_close(ep.module()(x), m(x))
    backends = ["native"] + (["triton"] if fusedact.triton.available() and TRITON_INTERPRET else [])
    for training, backend in [(t, b) for t in (True, False) for b in backends]:
        torch.library.opcheck(
            torch.ops.fusedact.batch_norm_stats.default,
            (x, torch.zeros(6), torch.ones(6), training, 0.1, 1e-5, backend),
        )
        for act, beta, p in (
            ("mish", 1.0, (None, None, None)),
            ("swish", 1.5, (None, None, None)),
            ("acon_c", 1.0, (torch.randn(6), torch.randn(6), torch.rand(2, 6))),
        ):
            args = (
                x.clone().requires_grad_(),
                torch.randn(6),
                torch.rand(6) + 0.5,
                torch.rand(6).requires_grad_(),
                torch.rand(6).requires_grad_(),
                training,
                1e-5,
                act,
                beta,
                *p,
                backend,
            )
            torch.library.opcheck(torch.ops.fusedact.batch_norm_act.default, args)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_is_batch_normalization_then_the_activation(tmp_path, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), fusedact.nn.BatchNormAct2d(6, act="hard_swish")).eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # torch's exporters fold an inference BatchNorm after a conv into the conv's weights,
    # or keep it as BatchNormalization: either way no fusedact op is left
    assert "HardSwish" in ops and not any("fusedact" in o for o in ops), ops
    out = ort.InferenceSession(str(path)).run(None, {ort.InferenceSession(str(path)).get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out[0]), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_opcheck_of_the_passes(backend):
    """The passes (C++, or Triton's) against their fakes (fusedact/_ops.py), a per-sample
    beta included: its sums come back flat, (N * C,)."""
    x, g = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)
    mean, a, b = torch.randn(6), torch.rand(6) + 0.5, torch.randn(6)
    ops = torch.ops.fusedact if backend == "native" else fusedact.triton.namespace()
    if backend == "triton":
        dz, sums = ops.bn_act_backward(g, x, [mean, a, b, torch.randn(6), torch.randn(6), torch.rand(4, 6)], "acon_c")
        assert sums[5].shape == (24,)
    torch.library.opcheck(ops.bn_stats.default, (x,))
    for act, extra in (
        ("silu", []),
        ("swish", [torch.rand(6)]),
        ("acon_c", [torch.randn(6), torch.randn(6), torch.rand(4, 6)]),
    ):
        params = [mean, a, b, *extra]
        torch.library.opcheck(ops.bn_act_forward.default, (x, params, act))
        torch.library.opcheck(ops.bn_act_backward.default, (g, x, params, act))
    torch.library.opcheck(ops.bn_dx.default, (g, x, [a, b, mean, b]))
    if backend == "native":
        torch.library.opcheck(ops.bn_moments.default, (x, mean))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "ncl", "small-nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device", BN_DEVICES)
def test_moment_stats_match_float64(device, dtype, layout, monkeypatch):
    """The GPU's batch statistics (batch_norm._moment_stats: two bn_moments passes), run
    here on the CPU's passes: bn_moments' sums against float64, x left as it was, and
    the mean and biased variance within float32's summation bound of float64's (the
    CPU's bn_stats, double sums, sits far inside it)."""
    from fusedact import batch_norm as bn

    device = _bn_device(device, "native", monkeypatch)
    torch.manual_seed(0)
    shape = {"ncl": (8, 6, 300), "small-nchw": (4, 6, 3, 5)}.get(layout, (8, 6, 40, 30))
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 300).to(dtype)  # a far mean: the shift matters
    x = make_layout(x, "channels_last" if layout == "channels_last" else "contiguous").to(device)
    before = x.clone()
    dims = [0, *range(2, x.dim())]
    x64 = x.double()
    shift = torch.randn(6, dtype=torch.float64, device=device)
    pt = torch.float64 if dtype == torch.float64 else torch.float32
    s1, s2 = torch.ops.fusedact.bn_moments(x, shift.to(pt))
    d = x64 - shift.to(pt).double().reshape(1, 6, *[1] * (x.dim() - 2))
    M = x.numel() // 6
    # fixed-order blocked sums in opmath: each term's rounding and the adds' (about
    # sqrt(M) ulp for the tree, bounded here by M ulp of the sum of magnitudes)
    ulp = torch.finfo(pt).eps
    for got, want, mag in ((s1, d.sum(dims), d.abs().sum(dims)), (s2, (d * d).sum(dims), (d * d).sum(dims))):
        assert got.dtype == pt and got.shape == (6,)
        assert ((got.double() - want).abs() <= 4 * M**0.5 * ulp * mag + 1e-300).all(), (got, want)
    assert torch.equal(x, before), "bn_moments writes nothing"
    mean, var = bn._moment_stats(x)
    m64, v64 = x64.mean(dims), x64.var(dims, unbiased=False)
    assert mean.dtype == var.dtype == pt
    # the second pass sums deviations about the first mean, so the variance's error is
    # that of a sum of squares (not of a cancelling E[x^2] - E[x]^2): relative, sqrt(M) ulp
    torch.testing.assert_close(mean.double(), m64, rtol=4 * M**0.5 * ulp, atol=4 * M**0.5 * ulp * v64.max() ** 0.5)
    torch.testing.assert_close(var.double(), v64, rtol=8 * M**0.5 * ulp, atol=0)


# Where bn_act_grad recomputes dz in its dx pass rather than store it (csrc/ops_impl.h,
# kBnRecomputeCheapBytes and kBnRecomputeBytes): by act, dtype and the bytes of x.
def _recomputes_dz(act, dtype, nbytes):
    if act == "identity":
        return True
    if act == "hard_swish":
        return nbytes >= 8 << 20
    return dtype not in (torch.float16, torch.bfloat16) and act != "acon_c" and nbytes >= 32 << 20


# x's shape: small, and large enough that bn_act_grad recomputes dz (hard_swish
# bfloat16: 12.6 MB; SiLU float32: 50 MB)
LARGE = {("hard_swish", torch.bfloat16): (16, 6, 256, 256), ("silu", torch.float32): (32, 6, 256, 256)}


# NCHW x: a channel at a time (its 60 elements; csrc/cpu/activations_cpu.cpp,
# channel_grad) or, past kChannelGradElems (32768) a channel, in the two passes;
# "blocks-nchw" a channel at a time too, its 600 runs of 49 in two blocks of runs whose
# lanes are folded once each (loops.h, RunBlocks: 334 runs of 49 to kSegment's 16384)
NCHW = {"small-nchw": (4, 6, 3, 5), "long-nchw": (4, 6, 96, 96), "blocks-nchw": (600, 6, 7, 7)}


@pytest.mark.parametrize("size", ["small", "large", *NCHW])
@pytest.mark.parametrize("act", ["acon_c", "silu", "hard_swish"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_one_call_ops_equal_the_passes(dtype, training, act, size):
    """bn_batch_stats / bn_act_apply / bn_act_grad (the passes with their per-channel
    arithmetic in C++, the native path's) give bitwise what the passes composed in Python
    give (the Triton and synced paths' composition), the running statistics within
    their rounding (bn_batch_stats rounds them once), and they pass opcheck against
    their fakes. Where bn_act_grad recomputes dz in its dx
    pass rather than store it, for 16-bit x its dx is the composition's run on x and g
    in float32 (dz never rounded to x's dtype), rounded once."""
    from fusedact import batch_norm as bn

    large = size == "large"
    if large and (act, dtype) not in LARGE:
        pytest.skip("the small x covers this case's path")
    torch.manual_seed(0)
    if size in NCHW:
        x = torch.randn(NCHW[size], dtype=dtype)
    else:
        x = torch.randn(LARGE[act, dtype] if large else (4, 6, 3, 5), dtype=dtype).to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    w, b = torch.rand(6, dtype=dtype) + 0.5, torch.randn(6, dtype=dtype)
    rm, rv = torch.randn(6, dtype=dtype), torch.rand(6, dtype=dtype) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    rm0, rv0 = rm.clone(), rv.clone()
    ops = torch.ops.fusedact
    mean, invstd = ops.bn_batch_stats(x, rm, rv, training, 0.1, 1e-5)
    if training:
        m2, var = ops.bn_stats(x)
        bn._update_running(rm2, rv2, m2, var, x.numel() // 6, 0.1)
    else:
        pt = bn._opmath(x)
        m2, var = rm2.to(pt), rv2.to(pt)
    for got, want in ((mean, m2), (invstd, torch.rsqrt(var + 1e-5))):
        assert torch.equal(got, want)
    # the running statistics: bn_batch_stats mixes in double and rounds once to their
    # dtype; the composition rounds (1 - m) r, the batch value and their sum in turn.
    # Each rounding errs by at most eps/2 of the terms' magnitude S = (1 - m)|r| + m|v|,
    # so the two differ by at most 2 eps S (4 roundings); S eps bounds it tighter than
    # any single ulp of a cancelled sum would
    eps = torch.finfo(dtype).eps
    for got, want, old, batch in ((rm, rm2, rm0, m2), (rv, rv2, rv0, var * (x.numel() // 6) / (x.numel() // 6 - 1))):
        if not training:
            assert torch.equal(got, want) and torch.equal(got, old)
            continue
        scale = 0.9 * old.double().abs() + 0.1 * batch.double().abs()
        assert ((got.double() - want.double()).abs() <= 2 * eps * scale).all()
        assert not torch.equal(got, old)
    p = [torch.randn(6), torch.randn(6), torch.rand(x.shape[0], 6)] if act == "acon_c" else []
    p = [t.to(bn._opmath(x)) for t in p]
    for weight, bias in ((w, b), (None, None)):
        a, b0 = bn._affine(x, weight, bias, invstd)
        y = ops.bn_act_apply(x, mean, invstd, weight, bias, p, act)
        assert torch.equal(y, ops.bn_act_forward(x, [mean, a, b0, *p], act))
        got = ops.bn_act_grad(g, x, weight, bias, mean, invstd, training, p, act)
        want = bn._backward_composed(g, x, weight, bias, mean, invstd, training, p, act, "native", None)
        assert _recomputes_dz(act, dtype, x.numel() * x.element_size()) == large
        if dtype == torch.bfloat16 and large:
            pt = bn._opmath(x)
            dx32 = bn._backward_composed(
                g.to(pt), x.to(pt), weight, bias, mean, invstd, training, p, act, "native", None
            )[0]
            assert torch.equal(got[0], dx32.to(dtype))
            assert not torch.equal(got[0], want[0])  # the test can fail: dz rounded differs
        else:
            assert torch.equal(got[0], want[0])
        for k in (1, 2):
            assert got[k].numel() == 0 if want[k] is None else torch.equal(got[k], want[k])
        assert all(torch.equal(u, v) for u, v in zip(got[3], want[3]))
    if large:
        return
    torch.library.opcheck(ops.bn_batch_stats.default, (x, rm, rv, training, 0.1, 1e-5))
    torch.library.opcheck(ops.bn_act_apply.default, (x, mean, invstd, w, b, p, act))
    torch.library.opcheck(ops.bn_act_grad.default, (g, x, w, b, mean, invstd, training, p, act))


@pytest.mark.parametrize("act", ["hard_swish", "silu", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_blocks_of_runs_sum_alike_on_every_cpu_isa(dtype, act, cpu_isa):
    """Short runs of a channel sum their lanes by blocks of runs (loops.h, RunBlocks):
    bn_act_grad a channel at a time (channel_grad) and the runs path (bn_act_backward,
    then bn_dx) give bitwise the same dx, dweight and dbias on each instruction set
    (each keeps its accumulators its own way: vectors of its width, or arrays), with
    runs of 49 (3 vectors and a tail for float32) in 2 blocks a channel, and with runs
    of 13 (a tail alone); and dweight, dbias match float64 within float32 rounding."""
    from fusedact import batch_norm as bn

    ops = torch.ops.fusedact
    for shape in ((600, 4, 7, 7), (40, 4, 13, 1)):
        torch.manual_seed(1)
        x, g = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        w, b = torch.rand(4) + 0.5, torch.randn(4)
        if dtype == torch.float64:
            w, b = w.double(), b.double()
        mean, invstd = ops.bn_batch_stats(x, None, None, True, 0.1, 1e-5)
        got = ops.bn_act_grad(g, x, w, b, mean, invstd, True, [], act)
        want = bn._backward_composed(g, x, w, b, mean, invstd, True, [], act, "native", None)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        # dbias = sum(dz), dweight = sum(dz xhat): against the same sums in float64
        xd, gd = x.double(), g.double()
        xhat = (xd - mean.double()[:, None, None]) * invstd.double()[:, None, None]
        z = (xhat * w.double()[:, None, None] + b.double()[:, None, None]).requires_grad_()
        act_fn = {"hard_swish": torch.nn.functional.hardswish, "silu": torch.nn.functional.silu}.get(act, lambda t: t)
        (dz,) = torch.autograd.grad(act_fn(z), z, gd)
        dims = (0, 2, 3)
        for got_k, want_k, term in ((got[2], dz.sum(dims), dz), (got[1], (dz * xhat).sum(dims), dz * xhat)):
            # float32 opmath (float64 for double): each term's rounding and the sum's
            # adds, |error| <= (M + 16) eps sum|term| for M terms a channel, generously
            eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
            bound = (term[:, 0].numel() * 4 + 16) * eps * term.abs().sum(dims) + 1e-300
            assert ((got_k.double() - want_k).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_statistics_blocks_alike_on_every_cpu_isa(dtype, cpu_isa):
    """The batch statistics sum a short channel's runs by blocks whose lanes fold into
    double once (bn_stats.h, kStatsSegment), a longer channel's a run at a time: on each
    instruction set bn_act_train (a channel at a time where it applies) gives bitwise
    bn_batch_stats then bn_act_apply, and the mean and biased variance of x far from zero
    match float64 within float32's summation bound (test_moment_stats_match_float64's)."""
    ops = torch.ops.fusedact
    # 8 blocks of 83 runs of 49 (3 vectors and a tail); runs of 13 (a tail alone); 40960
    # elements a channel (past kChannelGradElems: a run at a time)
    for shape in ((600, 4, 7, 7), (40, 4, 13, 1), (2, 4, 128, 160)):
        torch.manual_seed(2)
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 300).to(dtype)
        pt = torch.float64 if dtype == torch.float64 else torch.float32
        w, b = torch.rand(4, dtype=pt) + 0.5, torch.randn(4, dtype=pt)
        y, mean, invstd = ops.bn_act_train(x, None, None, w, b, [], "hard_swish", 0.1, 1e-5)
        mean2, invstd2 = ops.bn_batch_stats(x, None, None, True, 0.1, 1e-5)
        assert torch.equal(mean, mean2) and torch.equal(invstd, invstd2), shape
        assert torch.equal(y, ops.bn_act_apply(x, mean2, invstd2, w, b, [], "hard_swish")), shape
        m, var = ops.bn_stats(x)
        assert torch.equal(m, mean)
        x64, dims = x.double(), (0, 2, 3)
        m64, v64 = x64.mean(dims), x64.var(dims, unbiased=False)
        M = x.numel() // 4
        ulp = torch.finfo(pt).eps
        # opmath terms and lanes of at most kStatsSegment / 16 terms, blocks added in
        # double: within the sqrt(M) ulp bound of a blocked opmath sum, relative to the
        # sum of |x| (the mean) and of the squared deviations (the variance)
        assert ((m.double() - m64).abs() <= 4 * M**0.5 * ulp * x64.abs().mean(dims)).all(), shape
        assert ((var.double() - v64).abs() <= 8 * M**0.5 * ulp * v64).all(), shape


# Channels past kChannelGradElems (32768 elements), whose statistics take two passes
# over the whole of x (CpuBackend::channel_sums: runs in memory order, or blocks of rows)
_LONG_GEOMETRIES = {
    "nchw-long-runs": ((4, 3, 100, 100), "contiguous"),  # runs of 10000
    "nchw-short-runs": ((700, 3, 7, 7), "contiguous"),  # 34300 a channel in runs of 49
    "channels-last": ((4, 3, 100, 100), "channels_last"),  # blocks of 64 rows
    "nc": ((40000, 5), "contiguous"),  # BatchNorm1d's (N, C): rows too
}


@pytest.mark.parametrize("data", ["offset", "first-outlier", "constant"])
@pytest.mark.parametrize("geometry", list(_LONG_GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_long_channel_statistics_match_float64(dtype, geometry, data, cpu_isa):
    """The mean and biased variance of long channels against float64, within the bound
    of test_statistics_blocks_alike_on_every_cpu_isa: x far from zero (the second pass's
    shift matters); the first element of every channel 1e4 off (a shift of the first
    element, as a one-pass form might take, would sit far from the mean); and constant
    channels, whose mean comes out exact and variance exactly 0 (nn.BatchNorm2d's too at
    (4, 3, 100, 100); nn.BatchNorm1d's at (40000, 5) misses the mean by up to 7e-5 and
    gives variances up to 5e-9, torch 2.14). bn_act_train and bn_batch_stats agree
    bitwise. (A one-trip form, each piece about its own mean, passed these and was
    slower: benchmarks/NOTES.md, "The statistics in one trip through memory".)"""
    shape, layout = _LONG_GEOMETRIES[geometry]
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64) * 3
    C, dims = shape[1], [0, *range(2, len(shape))]
    if data == "offset":
        x += 1e4
    elif data == "first-outlier":
        x[(0, slice(None), *[0] * (len(shape) - 2))] += 1e4
    else:
        x = (torch.arange(C, dtype=torch.float64) * 0.1 + 0.1).reshape(1, C, *[1] * (len(shape) - 2)).expand(shape)
    x = make_layout(x.to(dtype), layout)
    mean, var = torch.ops.fusedact.bn_stats(x)
    x64 = x.double()
    m64, v64 = x64.mean(dims), x64.var(dims, unbiased=False)
    if data == "constant":
        assert torch.equal(x64.amax(dims), x64.amin(dims))
        assert torch.equal(mean.double(), x64.amax(dims)) and not var.any()
    else:
        M = x.numel() // C
        ulp = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        assert ((mean.double() - m64).abs() <= 4 * M**0.5 * ulp * x64.abs().mean(dims)).all(), (mean, m64)
        assert ((var.double() - v64).abs() <= 8 * M**0.5 * ulp * v64).all(), (var, v64)
    pt = mean.dtype
    _, m2, inv2 = torch.ops.fusedact.bn_act_train(x, None, None, torch.ones(C, dtype=pt), None, [], "silu", 0.1, 1e-5)
    m3, inv3 = torch.ops.fusedact.bn_batch_stats(x, None, None, True, 0.1, 1e-5)
    assert torch.equal(m2, mean) and torch.equal(m3, mean) and torch.equal(inv2, inv3)


@pytest.mark.parametrize("act_case", ACT_CASES, ids=[c[0] for c in ACT_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_chunks_equal_the_row_by_row_loop_on_every_cpu_isa(dtype, act_case, cpu_isa):
    """channels_last rows go by chunks of channels held in registers (loops.h,
    kChannelChunk: four vectors, 8 to 64 channels by instruction set and dtype): the
    statistics where C is a multiple of a chunk, y and dx where a row is one chunk; else
    channel by channel. Each channel's values and sums come out bitwise the same either
    way: x of 128 channels against its channels in parts of 8 or 16 to 64 (each chunk
    width of each instruction set is one part), through the statistics, the training
    forward and the backward (one block of rows a sample, so every part splits the sums
    alike), with per-sample parameters (Meta-ACON) too. Parts are whole vectors: ACON-C's
    float32 forward at AVX-512 differs in the last bit between a vector and its tail
    (benchmarks/NOTES.md, "channels_last statistics in registers")."""
    ops = torch.ops.fusedact
    _, act, make_params = act_case
    torch.manual_seed(3)
    C = 128
    widths = [8, 8, 16, 32, 64] if dtype == torch.float64 else [16, 16, 32, 64]
    shape = (3, C, 3, 5)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).to(memory_format=torch.channels_last)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).to(memory_format=torch.channels_last)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = 1 + 0.3 * torch.randn(C, dtype=pd), 0.2 * torch.randn(C, dtype=pd)
    ap = list(make_params(x, C, pd))
    name = "silu" if act == "swish" and not ap else act
    if act == "swish" and ap:  # the kernels' form of beta: a value a channel
        ap = [torch.full((C,), float(ap[0]), dtype=pd)]

    def run(lo, hi):
        def cut(t):
            return t[:, lo:hi] if t.dim() > 1 else t[lo:hi]

        xs = x[:, lo:hi].contiguous(memory_format=torch.channels_last)
        gs = g[:, lo:hi].contiguous(memory_format=torch.channels_last)
        ps = [cut(p).contiguous() for p in ap]
        rm, rv = torch.zeros(hi - lo, dtype=pd), torch.ones(hi - lo, dtype=pd)
        y, mean, invstd = ops.bn_act_train(xs, rm, rv, w[lo:hi], b[lo:hi], ps, name, 0.1, 1e-5)
        dx, dw, db, sums = ops.bn_act_grad(gs, xs, w[lo:hi], b[lo:hi], mean, invstd, True, ps, name)
        return [y, mean, invstd, rm, rv, dx, dw, db, *sums]

    whole = run(0, C)
    bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
    parts = [run(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    for k, t in enumerate(whole):
        if t.dim() == 4:  # y, dx: channels in dim 1
            want = torch.cat([p[k] for p in parts], 1)
        elif t.numel() == 3 * C:  # a per-sample parameter's sums, (N, C) flat
            want = torch.cat([p[k].reshape(3, -1) for p in parts], 1).reshape(-1)
        else:
            want = torch.cat([p[k] for p in parts])
        assert torch.equal(t.contiguous(), want.contiguous()), k


def test_convert_fuses_acon_c_where_its_keys_stay():
    """ACON-C's parameters fuse where they keep their state_dict keys: ultralytics' Conv
    (act stays Conv's child; bn only uses it) and timm's BatchNormAct2d (act.* there and
    here). Gradients of p1, p2, beta match; checkpoints load both ways; fuse() works."""
    conv = pytest.importorskip("ultralytics.nn.modules.conv")
    torch.manual_seed(0)

    def acon(c):
        a = fusedact.nn.AconC(c)
        with torch.no_grad():
            for p in a.parameters():
                p.copy_(torch.randn_like(p))
        return a

    model = nn.Sequential(conv.Conv(3, 8, 3, act=acon(8)), conv.Conv(8, 4, 1, act=fusedact.nn.MetaAconC(4)))
    ref = copy.deepcopy(model)
    keys = set(model.state_dict())
    fusedact.convert(model)
    assert isinstance(model[0].bn, fusedact.nn.BatchNormAct2d) and model[0].bn.act is model[0].act
    # Meta-ACON's beta comes from bn's output: it stays after bn, which runs as "identity"
    assert type(model[1].bn) is fusedact.nn.BatchNormAct2d and type(model[1].bn.act) is nn.Identity
    assert set(model.state_dict()) == keys and "0.bn.act.p1" not in model.state_dict()
    x = torch.randn(2, 3, 10, 10)
    for _ in range(2):
        torch.testing.assert_close(_train_step(model, x), _train_step(ref, x), rtol=1e-5, atol=1e-5)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    fresh = copy.deepcopy(ref)
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(ref.state_dict())
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    c = copy.deepcopy(model)  # EMA copies: the copy's bn uses the copy's act
    assert c[0].bn.act is c[0].act
    m = model[0]
    m.conv = __import__("ultralytics.utils.torch_utils", fromlist=["x"]).fuse_conv_and_bn(m.conv, m.bn)
    delattr(m, "bn")
    m.forward = m.forward_fuse
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)

    timm_norm_act = pytest.importorskip("timm.layers.norm_act")
    tb = timm_norm_act.BatchNormAct2d(8, act_layer=nn.Identity)
    tb.act = acon(8)
    tref = copy.deepcopy(tb)
    new = fusedact.convert(nn.Sequential(tb))[0]
    assert isinstance(new, fusedact.nn.BatchNormAct2d) and set(new.state_dict()) == set(tref.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(_train_step(new, x), _train_step(tref, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.act.p1.grad, tref.act.p1.grad, rtol=1e-4, atol=1e-5)


def test_sync_batch_norm_act_without_a_group_is_the_local_op_and_converts():
    """Outside torch.distributed (or in eval) SyncBatchNormAct is nn.SyncBatchNorm's
    fallback (F.batch_norm) then the activation; convert fuses nn.SyncBatchNorm + act with
    the same keys, and SyncBatchNormAct.convert_sync_batchnorm keeps fused blocks fused
    (torch's own turns them into a plain nn.SyncBatchNorm)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SyncBatchNorm(8), nn.SiLU(), nn.Conv2d(8, 4, 1))
    ref = copy.deepcopy(model)
    keys = set(model.state_dict())
    fusedact.convert(model)
    assert isinstance(model[1], fusedact.nn.SyncBatchNormAct) and isinstance(model[2], nn.Identity)
    assert set(model.state_dict()) == keys
    x = torch.randn(4, 3, 9, 9)
    for _ in range(2):
        torch.testing.assert_close(_train_step(model, x), _train_step(ref, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var, rtol=1e-6, atol=1e-7)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)

    conv = pytest.importorskip("ultralytics.nn.modules.conv")
    net = fusedact.convert(nn.Sequential(nn.BatchNorm2d(3), nn.Mish(), conv.Conv(3, 4, 3)))
    keys = set(net.state_dict())
    out = fusedact.nn.SyncBatchNormAct.convert_sync_batchnorm(net)
    assert isinstance(out[0], fusedact.nn.SyncBatchNormAct) and isinstance(out[2].bn, fusedact.nn.SyncBatchNormAct)
    assert out[2].bn.act is out[2].act and set(out.state_dict()) == keys
    assert isinstance(out[0].act, fusedact.nn.Mish)
    with pytest.raises(ValueError, match="CPU kernels"):
        fusedact.sync_batch_norm_act(torch.randn(2, 3, 4, device="meta"), None, None, None, None, 0.1, 1e-5, "mish")


@pytest.mark.parametrize("act_case", ACT_CASES, ids=[c[0] for c in ACT_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_function_equals_the_graph_ops_bit_for_bit(act_case, training):
    """A plain eager call runs one autograd.Function in place of the two graph ops
    (batch_norm_stats, batch_norm_act): the same passes, so y, every gradient and the
    running statistics are bitwise those of the ops called directly."""
    x, w, b, rm, rv, ap = _inputs(act_case, torch.float32, "channels_last")
    g = torch.randn(x.shape)
    beta, p1, p2, act_beta = fusedact.reference.split_act_params(act_case[1], ap)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()

    def through_ops(x, w, b, tp):
        tb, tp1, tp2, tab = fusedact.reference.split_act_params(act_case[1], tp)
        ops = torch.ops.fusedact
        mean, invstd = ops.batch_norm_stats(x.detach(), rm2, rv2, training, 0.1, 1e-5, "native")
        return ops.batch_norm_act(x, mean, invstd, w, b, training, 1e-5, act_case[1], tb, tp1, tp2, tab, "native")

    fast = _run(_fused(act_case[1], training, rm1, rv1), x, w, b, ap, g)
    y = _fused(act_case[1], training, rm.clone(), rv.clone())(x.requires_grad_(), w, b, ap)
    assert y.grad_fn.name() == "torch::autograd::CppNode<fusedact::BatchNormActFunction>"
    slow = _run(through_ops, x, w, b, ap, g)
    for a, e in zip(fast, slow):
        assert torch.equal(a, e)
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)


# x's shapes for each CPU loop that walks g beside x (csrc/cpu/activations_cpu.cpp): a
# channel at a time, runs of one channel, runs split in segments (past 16384 elements),
# rows of C channels (channels_last), (N, C, L)
GRAD_GEOMETRIES = {
    "small-nchw": ((4, 6, 3, 5), torch.contiguous_format),
    "long-nchw": ((4, 6, 96, 96), torch.contiguous_format),
    "segments": ((2, 3, 160, 160), torch.contiguous_format),
    "channels_last": ((4, 6, 5, 7), torch.channels_last),
    "ncl": ((4, 6, 10), torch.contiguous_format),
}


def _copies(f):
    """f()'s result and how many aten::copy_ calls it made."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = f()
    return out, sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)]


@pytest.mark.parametrize("geometry", GRAD_GEOMETRIES)
@pytest.mark.parametrize("act", ["silu", "hard_swish", "identity", "acon_c", "meta_acon_c"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_channel_slice_gradient_is_read_in_place(dtype, act, geometry):
    """A gradient that is a channel slice of a wider tensor in x's memory format (what
    torch.cat's backward hands each input, as in every YOLO neck) is read where it lies:
    bitwise the results of its dense copy, and no copy made (the CPU loops take its row
    stride). A slice along another dim is copied first, with the same results."""
    shape, fmt = GRAD_GEOMETRIES[geometry]
    torch.manual_seed(0)
    N, C = shape[:2]
    x = torch.randn(shape, dtype=dtype).to(memory_format=fmt)
    wide = torch.randn((N, 2 * C, *shape[2:]), dtype=dtype).to(memory_format=fmt)
    g = wide.narrow(1, C, C)
    assert not g.is_contiguous(memory_format=fmt)
    other = torch.randn((*shape[:-1], shape[-1] + 3), dtype=dtype).to(memory_format=fmt).narrow(-1, 1, shape[-1])
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    mean, invstd = torch.randn(C), torch.rand(C) + 0.5
    beta = {"acon_c": (C,), "meta_acon_c": (N, C)}  # per channel, per sample
    p = [torch.randn(C), torch.randn(C), torch.rand(beta[act])] if act in beta else []
    name = "acon_c" if "acon" in act else act
    ops = torch.ops.fusedact
    calls = {
        "bn_act_grad": lambda g: ops.bn_act_grad(g, x, w, b, mean, invstd, True, p, name),
        "bn_act_backward": lambda g: ops.bn_act_backward(g, x, [mean, w * invstd, b, *p], name),
    }
    if "acon" in act:
        calls["acon_c_backward"] = lambda g: ops.acon_c_backward(g, x, p[0], p[1], p[2], 1)
    g_dense = g.contiguous(memory_format=fmt)
    for op, call in calls.items():
        want, dense_copies = _copies(lambda: call(g_dense))
        got, copies = _copies(lambda: call(g))
        assert copies == dense_copies, f"{op}: the slice was copied"
        assert all(torch.equal(u, v) for u, v in zip(_flat(got), _flat(want))), op
        got, copies = _copies(lambda: call(other))
        want = call(other.contiguous(memory_format=fmt))
        assert copies > dense_copies, f"{op}: a slice along the last dim must be copied first"
        assert all(torch.equal(u, v) for u, v in zip(_flat(got), _flat(want))), op


# a geometry for each way the CPU passes split the work (csrc/cpu/activations_cpu.cpp)
THREAD_GEOMETRIES = {
    "short-runs-by-channel": ((8, 64, 7, 7), torch.contiguous_format),
    "runs-over-32768-a-channel": ((4, 8, 96, 96), torch.contiguous_format),
    "runs-in-segments": ((2, 3, 131, 131), torch.contiguous_format),  # 17161 > kSegment a run
    "stats-blocks": ((600, 6, 7, 7), torch.contiguous_format),
    "ncl": ((8, 40, 300), torch.contiguous_format),
    "channels_last": ((16, 24, 20, 20), torch.channels_last),
    "channels_last-tiled": ((16, 6, 20, 20), torch.channels_last),
}


@pytest.mark.parametrize("geometry", THREAD_GEOMETRIES)
@pytest.mark.parametrize("act", ["silu", "hard_swish", "acon_c", "meta_acon_c"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_do_not_depend_on_the_thread_count(dtype, act, geometry):
    """Issue 22's "deterministic, bitwise reproducible" on the CPU: the training
    forward (y, the statistics, the running statistics) and the backward (dx, dweight,
    dbias, the act's parameter sums) bit for bit the same with 1, 2 and 3 threads (the
    work splits differently with each; the sums go in a fixed order)."""
    shape, fmt = THREAD_GEOMETRIES[geometry]
    torch.manual_seed(0)
    N, C = shape[:2]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype).to(memory_format=fmt)
    g = torch.randn(shape).to(dtype).to(memory_format=fmt)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    beta = {"acon_c": (C,), "meta_acon_c": (N, C)}  # per channel, per sample
    p = [torch.randn(C), torch.randn(C), torch.rand(beta[act]) + 0.5] if act in beta else []
    name = "acon_c" if "acon" in act else act
    ops = torch.ops.fusedact
    runs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            rm, rv = torch.zeros(C), torch.ones(C)
            y, mean, invstd = ops.bn_act_train(x, rm, rv, w, b, p, name, 0.1, 1e-5)
            grads = ops.bn_act_grad(g, x, w, b, mean, invstd, True, p, name)
            runs.append([y, mean, invstd, rm, rv, *_flat(grads)])
    finally:
        torch.set_num_threads(before)
    assert len(runs[0]) == 8 + len(p)  # y, 4 statistics, dx, dweight, dbias, a sum for each act param
    for n, run in zip((2, 3), runs[1:]):
        for i, (a, c) in enumerate(zip(runs[0], run)):
            assert same_bits(a, c), f"output {i} differs with {n} threads"


# x's shapes for bn_act_train: a channel at a time (NCHW-like, at most 32768 elements a
# channel: csrc/cpu/activations_cpu.cpp, channel_train_forward), and the others, which
# take bn_batch_stats then bn_act_apply
TRAIN_GEOMETRIES = {
    "small-nchw": ((4, 6, 3, 5), torch.contiguous_format),
    "ncl": ((4, 6, 10), torch.contiguous_format),
    "one-sample-long-run": ((1, 3, 20000), torch.contiguous_format),
    "long-nchw": ((4, 6, 96, 96), torch.contiguous_format),
    "channels_last": ((4, 6, 5, 7), torch.channels_last),
    # 600 runs of 49 a channel in 8 blocks of 83 runs (bn_stats.h, kStatsSegment)
    "blocks-nchw": ((600, 6, 7, 7), torch.contiguous_format),
}


@pytest.mark.parametrize("geometry", TRAIN_GEOMETRIES)
@pytest.mark.parametrize("act_case", ACT_CASES, ids=[c[0] for c in ACT_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_train_forward_in_one_call_equals_stats_then_apply(dtype, act_case, geometry):
    """bn_act_train (the eager training forward: the statistics and y in one call, a
    channel at a time where x's channels are short runs) gives bitwise bn_batch_stats
    then bn_act_apply: y, mean, invstd and the running statistics; with and without the
    affine; it passes opcheck against its fake."""
    shape, fmt = TRAIN_GEOMETRIES[geometry]
    _, act, make = act_case
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).to(memory_format=fmt)
    C = shape[1]
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    params = fusedact.reference.split_act_params(act, make(x, C, pd))
    from fusedact import batch_norm as bn

    beta, p1, p2, act_beta = params
    act_params = bn._act_tensors(x, act, beta, p1, p2, act_beta)
    kernel_act = bn._kernel_act(act, beta, act_beta)
    ops = torch.ops.fusedact
    for affine in (True, False):
        w, b = (1 + 0.3 * torch.randn(C, dtype=pd), 0.2 * torch.randn(C, dtype=pd)) if affine else (None, None)
        rm, rv = 0.1 * torch.randn(C, dtype=pd), 1 + 0.2 * torch.rand(C, dtype=pd)
        rm2, rv2 = rm.clone(), rv.clone()
        y, mean, invstd = ops.bn_act_train(x, rm, rv, w, b, act_params, kernel_act, 0.1, 1e-5)
        mean2, invstd2 = ops.bn_batch_stats(x, rm2, rv2, True, 0.1, 1e-5)
        y2 = ops.bn_act_apply(x, mean2, invstd2, w, b, act_params, kernel_act)
        for name, u, v in (("y", y, y2), ("mean", mean, mean2), ("invstd", invstd, invstd2), ("rm", rm, rm2)):
            assert torch.equal(u, v), name
        assert torch.equal(rv, rv2) and y.stride() == x.stride()
    torch.library.opcheck(ops.bn_act_train.default, (x, rm, rv, w, b, act_params, kernel_act, 0.1, 1e-5))


def test_train_forward_in_one_call_checks_as_batch_stats():
    ops = torch.ops.fusedact
    x = torch.randn(4, 6, 3, 5)
    with pytest.raises(RuntimeError, match="give both running_mean and running_var"):
        ops.bn_act_train(x, torch.zeros(6), None, None, None, [], "silu", 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have C = 6"):
        ops.bn_act_train(x, None, None, torch.ones(5), None, [], "silu", 0.1, 1e-5)
    # every geometry, the channel-at-a-time one and those that fall back to the statistics
    # pass (channels_last; a channel over 32768 elements): checked before the running
    # statistics change
    long_runs = torch.randn(2, 6, 128, 130)
    for xi in (x, x.contiguous(memory_format=torch.channels_last), long_runs):
        rm, rv = torch.zeros(6), torch.ones(6)
        for w, b, what in ((torch.ones(5), None, "weight"), (None, torch.zeros(7), "bias")):
            with pytest.raises(RuntimeError, match=f"bn_act_train: {what} must have C = 6"):
                ops.bn_act_train(xi, rm, rv, w, b, [], "silu", 0.1, 1e-5)
        assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6))
    with pytest.raises(RuntimeError, match="no elements per channel"):
        ops.bn_act_train(x[:0], None, None, None, None, [], "silu", 0.1, 1e-5)


def _slow(monkeypatch):
    """batch_norm_act without its C++-checked first stop: the Python checks' way."""
    from fusedact import batch_norm as bn

    monkeypatch.setattr(bn, "_fast_checked", lambda *args: None)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act_case", ACT_CASES, ids=[c[0] for c in ACT_CASES])
def test_checked_entry_gives_the_checked_way_bit_for_bit(act_case, training, monkeypatch):
    """A plain eager CPU call takes _C.fast.batch_norm_act_checked (its argument checks in
    C++, csrc/fast_path.cpp) and gives what the Python checks' way gives: y, the gradients
    and the running statistics, bit for bit; with no gradient wanted, y without a graph.
    The Python checks are made to fail, to show they did not run."""
    from fusedact import batch_norm as bn

    x, w, b, rm, rv, ap = _inputs(act_case, torch.float32, "contiguous")
    g = torch.randn(x.shape)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    with monkeypatch.context() as m:

        def checks(*args):
            raise AssertionError("the checked entry declined a plain call")

        if act_case[0] != "swish-tensor":  # a tensor beta goes the Python way
            m.setattr(bn, "_check", checks)
        fast = _run(_fused(act_case[1], training, rm1, rv1), x, w, b, ap, g)
        with torch.no_grad():
            y = _fused(act_case[1], training, rm.clone(), rv.clone())(x, w, b, ap)
    assert y.grad_fn is None and torch.equal(y, fast[0])
    _slow(monkeypatch)
    slow = _run(_fused(act_case[1], training, rm2, rv2), x, w, b, ap, g)
    for a, e in zip(fast, slow):
        assert torch.equal(a, e)
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)


def test_checked_entry_declines_what_python_must_check():
    """The C++-checked entry returns None, and Python's checks then raise or take another
    way, for anything but plain floating CPU tensors of the right shapes and plain
    arguments: a subclass or FakeTensor, an integer or meta x, a parameter of the wrong
    length or rank, half the running statistics, eval without them, a non-bool training,
    momentum None, one value a channel in training, an unknown act or the wrong number of
    parameters, a tensor or non-finite or too large beta, a bool beta, under a torch
    function mode and under the JIT tracer (the ONNX exporter's)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    entry = fusedact._C.fast.batch_norm_act_checked
    C = 3
    x = torch.randn(2, C, 4, 4)
    w, b, rm, rv = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
    p = (torch.ones(C), torch.zeros(C), torch.ones(C))

    def call(x=x, rm=rm, rv=rv, w=w, b=b, training=True, momentum=0.1, eps=1e-5, act="swish", params=()):
        return entry(x, rm, rv, w, b, training, momentum, eps, act, params)

    assert call() is not None and call(act="acon_c", params=p) is not None
    assert call(rm=None, rv=None, w=None, b=None) is not None
    assert call(act="acon_c", params=(*p[:2], torch.ones(2, C))) is not None  # Meta-ACON's beta
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    declined = {
        "subclass": call(x=x.as_subclass(_Tagged)),
        "fake": call(x=fake),
        "integer x": call(x=torch.ones(2, C, 4, 4, dtype=torch.long)),
        "meta x": call(x=x.to("meta")),
        "list x": call(x=[1.0]),
        "1-d x": call(x=torch.randn(C)),
        "empty x": call(x=torch.randn(0, C, 4, 4)),
        "weight length": call(w=torch.ones(C + 1)),
        "weight rank": call(w=torch.ones(C, 1)),
        "integer bias": call(b=torch.zeros(C, dtype=torch.long)),
        "half the statistics": call(rv=None),
        "eval without statistics": call(rm=None, rv=None, training=False),
        "training 1": call(training=1),
        "momentum None": call(momentum=None),
        "one value a channel": call(x=torch.randn(1, C, 1, 1)),
        "unknown act": call(act="relu"),
        "act not a str": call(act=None),
        "params a list": call(params=[]),
        "mish with a parameter": call(act="mish", params=(1.0,)),
        "tensor beta": call(params=(torch.ones(1),)),
        "nan beta": call(params=(float("nan"),)),
        "inf beta": call(params=(float("inf"),)),
        "beta past float32": call(params=(1e39,)),
        "bool beta": call(params=(True,)),
        "acon p1 length": call(act="acon_c", params=(torch.ones(C + 1), *p[1:])),
        "acon two params": call(act="acon_c", params=p[:2]),
    }
    with _PassThrough():
        declined["function mode"] = call()
    seen = []

    def traced(t):
        seen.append(call(x=t))
        return t * 2

    torch.jit.trace(traced, x)
    declined["jit tracer"] = seen[0]
    assert [k for k, v in declined.items() if v is not None] == []


class _Tagged(torch.Tensor):
    pass


class _PassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_module_takes_the_checked_entry(monkeypatch):
    """BatchNormAct2d's plain eager training and eval calls reach the C++-checked entry
    (the Python checks are made to fail), and the same call under a torch function mode
    goes the Python way."""
    from fusedact import batch_norm as bn

    m = fusedact.nn.BatchNormAct2d(3, act="mish")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    calls = []
    check = bn._check
    monkeypatch.setattr(bn, "_check", lambda *args: calls.append(args) or check(*args))
    m(x).sum().backward()
    m.eval()
    m(x)
    assert calls == []
    with _PassThrough():
        m(x)
    assert len(calls) == 1


@pytest.mark.parametrize("act", ["identity", "silu", "swish", "mish", "hard_swish", "acon_c"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_elements_bits_do_not_depend_on_its_position_in_a_run(dtype, act, cpu_isa):
    """The normalize-and-activate pass and the backward's elementwise pass (with fixed
    statistics: eval) give an element the same bits wherever it falls in its channel's
    run: x as one run of n against its pieces (every offset in a vector, tails of every
    length, runs shorter than a vector) and against runs of 5 to 100 in one call. GCC's
    scalar epilogue rounded ACON-C's forward (float32) and mish's dx (float64) apart
    from the vector code at AVX2/AVX-512 (the unary ops: test_parity.py,
    test_cpu_values_do_not_depend_on_the_code_path)."""
    ops = torch.ops.fusedact
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    torch.manual_seed(4)
    n_all = 1043
    x = (torch.randn(n_all, dtype=torch.float64) * 3).to(dtype)
    g = torch.randn(n_all, dtype=torch.float64).to(dtype)
    stats = [torch.tensor([v], dtype=pd) for v in (0.3, 1.7)]
    affine = [torch.tensor([v], dtype=pd) for v in (1.2, -0.1)]
    ap = {"swish": [torch.tensor([1.3], dtype=pd)], "acon_c": [torch.tensor([v], dtype=pd) for v in (1.3, 0.2, 0.9)]}
    params = ap.get(act, [])

    def run(xs, gs):  # xs, gs: (1, C, L), every channel the same parameters
        C = xs.shape[1]
        mean, invstd = (t.repeat(C) for t in stats)
        w, b = (t.repeat(C) for t in affine)
        p = [t.repeat(C) for t in params]
        y = ops.bn_act_apply(xs, mean, invstd, w, b, p, act)
        dx = ops.bn_act_grad(gs, xs, w, b, mean, invstd, False, p, act)[0]
        return y.reshape(-1), dx.reshape(-1)

    y, dx = run(x.view(1, 1, -1), g.view(1, 1, -1))
    for a in range(18):
        # n >= 2: (1, 1, 1) is a row of one channel (inner 1), channels_last's loop
        for n in (2, 7, 15, 16, 17, 31, 33, 100, 530):
            ys, dxs = run(x[a : a + n].clone().view(1, 1, -1), g[a : a + n].clone().view(1, 1, -1))
            assert same_bits(ys, y[a : a + n]), f"y[{a}:{a + n}]"
            assert same_bits(dxs, dx[a : a + n]), f"dx[{a}:{a + n}]"
    for inner in (5, 17, 33, 100):
        ys, dxs = run(x[: 9 * inner].view(1, 9, inner), g[: 9 * inner].view(1, 9, inner))
        assert torch.equal(ys.view(-1), y[: 9 * inner]) and torch.equal(dxs.view(-1), dx[: 9 * inner]), inner


@pytest.mark.parametrize("act", ["identity", "silu", "swish", "mish", "hard_swish", "acon_c"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_passes_read_nothing_past_the_end(dtype, act, cpu_isa):
    """x and grad of one channel's run end where an unreadable page begins: the
    statistics, the normalize-and-activate pass and the backward's passes (train and
    eval; runs shorter than a vector are copied into a zero-padded block by masked loads)
    read no element past n, and give the values of the same data elsewhere."""
    ops = torch.ops.fusedact
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    ap = {"swish": [torch.tensor([1.3], dtype=pd)], "acon_c": [torch.tensor([v], dtype=pd) for v in (1.3, 0.2, 0.9)]}
    w, b = torch.tensor([1.2], dtype=pd), torch.tensor([-0.1], dtype=pd)

    def passes(x, g):
        mean, invstd = ops.bn_batch_stats(x, None, None, True, 0.1, 1e-5)
        y = ops.bn_act_apply(x, mean, invstd, w, b, ap.get(act, []), act)
        out = [mean, invstd, y]
        for training in (True, False):
            out += [t for t in ops.bn_act_grad(g, x, w, b, mean, invstd, training, ap.get(act, []), act)[:3]]
        return out

    for n in list(range(2, 34)) + [100]:  # (1, 1, 1) is a row of one channel
        torch.manual_seed(n)
        x = (torch.randn(1, 1, n, dtype=torch.float64) * 3).to(dtype)
        g = torch.randn(1, 1, n, dtype=torch.float64).to(dtype)
        for got, want in zip(passes(at_a_page_end(x), at_a_page_end(g)), passes(x, g)):
            assert same_bits(got, want), n


@pytest.mark.parametrize("act", ["identity", "silu", "swish", "mish", "hard_swish", "acon_c", "meta_acon_c"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_elements_bits_do_not_depend_on_the_layout(dtype, act, cpu_isa):
    """With fixed statistics (eval) the normalize-and-activate pass and the backward's
    elementwise pass give an element the same bits in NCHW, channels_last and (N, C, L):
    channels_last rows go by chunks of channels in registers where a row is one chunk
    (16 to 64 channels by instruction set and dtype), channel by channel where wider,
    and rows under a vector (C < 16, or 8 for float64) as pieces of lcm(C, 16) elements
    with the parameters tiled (loops.h, RowTiles); C runs over all three, with rows that
    end in part of a vector and, under a vector, H W rows that end in part of a piece."""
    ops = torch.ops.fusedact
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    small = (1, 3, 4, 5, 6, 7, 8, 12, 14, 15)  # row by row, float16 y differed: ACON-C 6, 14, 15; Meta 4, 7, 15
    cases = [(C, 7, 9) for C in small] + [(C, 16, 20) for C in small + (16, 17, 24, 32, 33, 40, 64, 80)]
    for C, H, W in cases:
        torch.manual_seed(C)
        N = 2
        x = (torch.randn(N, C, H, W, dtype=torch.float64) * 3).to(dtype)
        g = torch.randn(N, C, H, W, dtype=torch.float64).to(dtype)
        mean, w, b = (0.3 * torch.randn(C, dtype=pd) for _ in range(3))
        invstd = 0.5 + torch.rand(C, dtype=pd)
        w += 1
        ap = {
            "swish": [1.3 + 0.1 * torch.randn(C, dtype=pd)],
            "acon_c": [torch.randn(C, dtype=pd), torch.randn(C, dtype=pd), 1 + 0.5 * torch.randn(C, dtype=pd)],
            "meta_acon_c": [torch.randn(C, dtype=pd), torch.randn(C, dtype=pd), 1 + 0.5 * torch.randn(N, C, dtype=pd)],
        }.get(act, [])
        name = "acon_c" if act == "meta_acon_c" else act

        def run(xs, gs):
            y = ops.bn_act_apply(xs, mean, invstd, w, b, ap, name)
            dx = ops.bn_act_grad(gs, xs, w, b, mean, invstd, False, ap, name)[0]
            return y.contiguous(), dx.contiguous()

        want = run(x, g)
        cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, g)]
        got_cl = run(*cl)
        got_ncl = [t.view(N, C, H, W) for t in run(x.view(N, C, H * W), g.view(N, C, H * W))]
        for got, layout in ((got_cl, "channels_last"), (got_ncl, "ncl")):
            assert same_bits(got[0], want[0]), f"y, {layout}, C={C}"
            assert same_bits(got[1], want[1]), f"dx, {layout}, C={C}"
