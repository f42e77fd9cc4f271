"""The native ops' fast path from the functional API (csrc/fast_path.cpp): taken for the
no-grad call and plain autograd, it gives the op's results bit for bit (forward, first
and second derivatives), declines inside torch.func transforms and for forward-AD dual
tensors, and leaves __torch_function__ overrides and dispatch modes their view of the
op. Speed is the benchmark's (``bench.py --overhead``), never asserted here."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedact
from fusedact import _C
from conftest import DEVICES
from helpers import make_params, rand_x

CASES = ["silu", "swish", "swish-tensor", "mish", "hard_swish", "acon_c", "meta_acon"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
FN = {
    "swish": ("SiluFunction", "SwishFunction", "SwishTensorFunction"),
    "mish": ("MishFunction",),
    "hard_swish": ("HardSwishFunction",),
    "acon_c": ("AconCFunction",),
}

# the ops' own Python Functions (fusedact/functions.py), named apart from the C++ ones
OP_FN = {"swish": "SwishOpFunction", "mish": "MishOpFunction", "hard_swish": "HardSwishOpFunction"}
OP_FN["acon_c"] = "AconCOpFunction"


def on_fast_path(y, op) -> bool:
    """y's node is one of op's C++ Functions (csrc/fast_path.cpp)."""
    return y.grad_fn.name() in {f"torch::autograd::CppNode<fusedact::{fn}>" for fn in FN[op]}


def case_args(case, dtype, seed=0, device="cpu"):
    """(op, x, params, functional(x, *params), the op's call(x, *params))."""
    x = rand_x((2, 5, 3, 4), dtype, device, seed=seed)
    op = case.split("-")[0]
    if case == "silu":
        return "swish", x, [], (lambda x: fusedact.swish(x)), (lambda x: torch.ops.fusedact.swish_forward(x, 1.0, None))
    if case == "swish":
        return op, x, [], (lambda x: fusedact.swish(x, 1.7)), (lambda x: torch.ops.fusedact.swish_forward(x, 1.7, None))
    if case == "swish-tensor":
        params = make_params("swish", x, param_dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
        return op, x, params, fusedact.swish, (lambda x, b: torch.ops.fusedact.swish_forward(x, 1.0, b))
    if case in ("acon_c", "meta_acon"):
        params = make_params(
            "acon_c", x, per_sample=case == "meta_acon", param_dtype=torch.float32 if dtype == torch.bfloat16 else dtype
        )
        return "acon_c", x, params, fusedact.acon_c, (lambda x, *p: torch.ops.fusedact.acon_c_forward(x, *p, 1))
    ops = getattr(torch.ops.fusedact, f"{op}_forward")
    return op, x, [], getattr(fusedact, op), ops


def fast_call(op, x, params):
    """_C.fast's own answer: a tensor, or None where it declines."""
    if op == "swish":
        return _C.fast.swish_forward(x, 1.0, params[0]) if params else _C.fast.swish(x, 1.0)
    if op == "acon_c":
        return _C.fast.acon_c_forward(x, *params, 1)
    return getattr(_C.fast, op)(x)


def fresh_leaves(*tensors):
    """Detached copies that require grad: the leaves of one forward+backward."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def forward_backward(f, x, params, g):
    leaves = fresh_leaves(x, *params)
    y = f(*leaves)
    return y, torch.autograd.grad(y, leaves, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_fast_path_gives_the_op_bit_for_bit(case, dtype, device):
    """On the CPU here; on CUDA (the CUDA kernels, through the same dispatcher call) where
    a GPU is present."""
    op, x, params, functional, op_call = case_args(case, dtype, device=device)
    assert fast_call(op, x, params) is not None  # it applies here
    with torch.no_grad():
        assert torch.equal(functional(x, *params), op_call(x, *params))
    g = rand_x(x.shape, dtype, device, seed=7)
    y_short, grads_short = forward_backward(functional, x, params, g)
    y_op, grads_op = forward_backward(op_call, x, params, g)
    # the fast path's node is the C++ Function; the op's own autograd is the Python one
    assert on_fast_path(y_short, op), y_short.grad_fn.name()
    assert "CppNode" not in y_op.grad_fn.name(), y_op.grad_fn.name()
    assert y_op.grad_fn.name() == f"{OP_FN[op]}Backward"  # the Python one has its own name
    assert torch.equal(y_short, y_op)
    for a, b in zip(grads_short, grads_op):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_fast_path_second_derivatives(case):
    """create_graph=True: the C++ Function's backward calls the backward op with its own
    autograd, so double backward is the op's, and gradgradcheck passes in float64."""
    op, x, params, functional, op_call = case_args(case, torch.float64)
    leaves = fresh_leaves(x, *params)
    assert on_fast_path(functional(*leaves), op)
    small = [t[:1, :2, :2, :2] if t is leaves[0] else t for t in leaves]
    if case == "meta_acon":  # beta per sample: one sample
        small[-1] = small[-1][:1]
    if op == "acon_c":  # two channels
        small[1:] = [p[..., :2] for p in small[1:]]
    small = fresh_leaves(*small)
    assert torch.autograd.gradgradcheck(functional, small)
    g = rand_x(x.shape, torch.float64, "cpu", seed=3)

    def second(f):
        ls = fresh_leaves(*leaves)
        first = torch.autograd.grad(f(*ls), ls, g, create_graph=True)
        return torch.autograd.grad(sum((d * d).sum() for d in first), ls, allow_unused=True)

    for a, b in zip(second(functional), second(op_call)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_fast_path_declines_inside_transforms(case):
    """Inside torch.func.grad and for a dual tensor, _C.fast returns None and the call goes
    the op's way (its Python Function has the vmap rule and the JVP)."""
    op, x, params, functional, _ = case_args(case, torch.float64)
    seen = []

    def f(x):
        seen.append(fast_call(op, x, params))
        return functional(x, *params).sum()

    grad = torch.func.grad(f)(x)
    assert seen == [None]
    xl = x.clone().requires_grad_()
    want = torch.autograd.grad(functional(xl, *params).sum(), xl)[0]
    torch.testing.assert_close(grad, want, rtol=0, atol=0)

    t = rand_x(x.shape, torch.float64, "cpu", seed=4)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, t)
        assert fast_call(op, dual, params) is None
        tangent = forward_ad.unpack_dual(functional(dual, *params)).tangent
    assert tangent is not None
    jvp = torch.func.jvp(lambda x: functional(x, *params), (x,), (t,))[1]
    torch.testing.assert_close(tangent, jvp, rtol=0, atol=0)


class Logged(torch.Tensor):
    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class FunctionLog(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


class DispatchLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def _names(calls):
    return {str(c) for c in calls}


@pytest.mark.parametrize("case", ["mish", "swish-tensor", "acon_c"])
def test_overrides_see_the_op(case):
    """A __torch_function__ subclass and a TorchFunctionMode see the fused op (the call
    goes the long way, through torch.ops); a TorchDispatchMode sees the forward op on the
    fast path and the backward op in its backward."""
    op, x, params, functional, _ = case_args(case, torch.float32)
    fwd, bwd = f"fusedact.{op}_forward.default", f"fusedact.{op}_backward.default"

    Logged.calls = []
    y = functional(x.as_subclass(Logged), *params)
    assert any(fwd.rsplit(".", 1)[0] in str(c) for c in Logged.calls), Logged.calls
    torch.testing.assert_close(y.as_subclass(torch.Tensor), functional(x, *params), rtol=0, atol=0)

    with FunctionLog() as mode:
        functional(x, *params)
    assert any(fwd.rsplit(".", 1)[0] in str(c) for c in mode.calls), mode.calls

    xl = x.clone().requires_grad_()
    with DispatchLog() as mode:
        y = functional(xl, *params)
        assert on_fast_path(y, op)
        y.sum().backward()
    assert {fwd, bwd} <= _names(mode.calls), mode.calls


def test_plain_tensor_entry_declines_what_python_must_see():
    """swish (float beta), mish and hard_swish check x in C++ (_C.fast.swish/mish/
    hard_swish): they take a plain Tensor or Parameter of a floating dtype and decline
    (None) a subclass, a FakeTensor (torch.export without Dynamo), an integer dtype, a
    non-tensor and any torch function mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 3)
    entries = {
        "mish": (_C.fast.mish, fusedact.mish),
        "hard_swish": (_C.fast.hard_swish, fusedact.hard_swish),
        "swish": (lambda t: _C.fast.swish(t, 1.5), lambda t: fusedact.swish(t, 1.5, backend="eager")),
        "silu": (lambda t: _C.fast.swish(t, 1), lambda t: fusedact.swish(t, backend="eager")),
    }
    for name, (entry, want) in entries.items():
        torch.testing.assert_close(entry(x), want(x), msg=name)
        assert entry(torch.nn.Parameter(x.clone())).grad_fn is not None, name
        assert entry(x.as_subclass(Logged)) is None, name
        assert entry(torch.arange(4)) is None, name
        assert entry([1.0, 2.0]) is None, name
        with FunctionLog():
            assert entry(x) is None, name
        with FakeTensorMode() as mode:
            assert entry(mode.from_tensor(x)) is None, name
    with pytest.raises(TypeError):
        _C.fast.swish(x, "a")


def test_bad_arguments_take_the_checked_way():
    """An integer x or a bad beta fails with the Python checks' message, as before."""
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        fusedact.mish(torch.arange(4))
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        fusedact.swish(torch.arange(4), 1.5)
    with pytest.raises(TypeError, match="fusedact.hard_swish: x must be a tensor, got list"):
        fusedact.hard_swish([1.0, 2.0])
    with pytest.raises(RuntimeError, match="beta must be a float or a tensor with one element"):
        fusedact.swish(torch.randn(4), torch.ones(2))
    with pytest.raises(RuntimeError, match="p1 must have C = 3"):
        fusedact.acon_c(torch.randn(2, 3, 4), torch.ones(2), torch.ones(3), torch.ones(3))


def test_compiled_autograd_runs_the_fast_path_backward():
    """Compiled autograd (torch.compile of the backward of an eager forward) runs the C++
    Functions' backward as opaque calls: the gradients of the eager engine."""
    torch.manual_seed(0)
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    p1, p2, b = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def loss():
        y = fusedact.swish(x) + fusedact.swish(x, 1.3) + fusedact.mish(x) + fusedact.hard_swish(x)
        y = y + fusedact.acon_c(x.view(2, 4, 8), p1, p2, b).view(-1)
        return (y * y).sum()

    want = torch.autograd.grad(loss(), [x, p1, p2, b])
    out = loss()
    assert on_fast_path(fusedact.mish(x), "mish")
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
        got = torch.autograd.grad(out, [x, p1, p2, b])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


def test_autograd_behaviours_on_the_fast_path():
    """What autograd promises holds for the C++ Functions: anomaly mode, saved-tensor hooks
    (what activation offloading and checkpointing use), the in-place check on a saved
    input, and the freed graph after a backward without retain_graph."""
    x = rand_x((64,), torch.float64, "cpu").requires_grad_()
    want = torch.autograd.grad(fusedact.mish(x).sum(), x)[0]
    with torch.autograd.set_detect_anomaly(True):
        assert torch.equal(torch.autograd.grad(fusedact.mish(x).sum(), x)[0], want)

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(), lambda t: t):
        y = fusedact.hard_swish(x)
    assert on_fast_path(y, "hard_swish") and len(packed) == 1 and packed[0] is x
    torch.testing.assert_close(
        torch.autograd.grad(y.sum(), x)[0],
        torch.autograd.grad(torch.ops.fusedact.hard_swish_forward(x).sum(), x)[0],
        rtol=0,
        atol=0,
    )

    w = x * 1
    y = fusedact.mish(w)
    w.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    y = fusedact.swish(x)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


SINGLE_INPUT = ["silu", "swish", "mish", "hard_swish"]  # their nodes are built by apply_on_x


@pytest.mark.parametrize("case", CASES)
def test_fast_path_node_is_wired_like_apply(case):
    """The node the fast path builds (csrc/fast_path.cpp, apply_on_x, for one tensor
    input) is wired as Function::apply wires it: x's AccumulateGrad (or the producing
    node) as its only next function, retain_graph honoured, the output's version and
    requires_grad as the op's own, and hooks on the node run in backward."""
    op, x, params, functional, _ = case_args(case, torch.float64)
    leaves = fresh_leaves(x, *params)
    y = functional(*leaves)
    assert on_fast_path(y, op) and y.requires_grad and not y.is_leaf and y._version == 0
    nexts = y.grad_fn.next_functions
    assert len(nexts) == len(leaves)  # one edge per tensor input, to its AccumulateGrad
    assert all(n[0].variable is leaf and n[1] == 0 for n, leaf in zip(nexts, leaves))
    seen = []
    y.grad_fn.register_hook(lambda gi, go: seen.append((len(gi), go[0].shape)))
    g1 = torch.autograd.grad(y.sum(), leaves, retain_graph=True)
    g2 = torch.autograd.grad(y.sum(), leaves)
    assert seen and seen[0][1] == y.shape and len(seen) == 2
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    h = leaves[0] * 2  # a non-leaf input: the edge goes to MulBackward0
    assert type(functional(h, *leaves[1:]).grad_fn.next_functions[0][0]).__name__ == "MulBackward0"


@pytest.mark.skipif(
    not hasattr(torch.autograd.graph, "node_creation_hook"),
    reason="torch.autograd.graph.node_creation_hook is new in torch 2.14",
)
@pytest.mark.parametrize("case", CASES)
def test_node_creation_hook_sees_the_fast_path_node_once(case):
    """torch 2.14's node creation hooks fire once for the fast path's node, with it fully
    built (next functions wired), as for any node made by Function::apply."""
    op, x, params, functional, _ = case_args(case, torch.float64)
    leaves = fresh_leaves(x, *params)
    seen = []
    with torch.autograd.graph.node_creation_hook(lambda n: seen.append((n, n.next_functions))):
        y = functional(*leaves)
    assert on_fast_path(y, op)
    ours = [(n, nexts) for n, nexts in seen if type(n).__name__ != "AccumulateGrad"]  # leaves' accumulators fire too
    assert len(ours) == 1 and ours[0][0] is y.grad_fn
    assert len(ours[0][1]) == len(leaves) and all(e[0].variable is leaf for e, leaf in zip(ours[0][1], leaves))


class InputReturning(TorchDispatchMode):
    """Returns the fused forward ops' input itself (an identity activation)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("fusedact.") and "_forward" in str(func):
            return args[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", SINGLE_INPUT)
def test_fast_path_under_a_dispatch_mode_returning_the_input(case):
    """Under a Python dispatch mode the forward may return anything, even its input: the
    fast path then lets Function::apply wrap it (an input returned as-is becomes a view of
    it), as the op's own Python Function does, and the gradients agree. Building the node
    by hand there would trip apply_on_x's internal check."""
    op, x, params, functional, op_call = case_args(case, torch.float64)
    grads = []
    for f in (functional, op_call):
        xm = x.clone().requires_grad_()
        with InputReturning():
            y = f(xm)
            assert y is not xm and y._is_view() and torch.equal(y, xm)
            grads.append(torch.autograd.grad(y.sum(), xm)[0])
        assert f is op_call or on_fast_path(y, op)
    assert torch.equal(*grads)


def _another_thread_ran_during(call, repeats=100) -> bool:
    """Whether a thread waiting for the GIL ran while `call` ran (`repeats` times, or until
    it did: a kernel may end before the thread wakes). The switch interval is set far
    beyond the test, so the interpreter never hands the GIL over by itself: the waiting
    thread runs only if C code releases the GIL (as ATen's ops do)."""
    import sys
    import threading

    ready, ran = threading.Event(), []
    thread = threading.Thread(target=lambda: (ready.wait(), ran.append(True)))
    before = sys.getswitchinterval()
    thread.start()
    sys.setswitchinterval(1000.0)
    try:
        ready.set()  # the thread now waits for the GIL alone
        kept = []  # freeing a tensor may itself release the GIL: keep the results
        for _ in range(repeats):
            kept.append(call())
            if ran:
                break
        seen = bool(ran)
    finally:
        sys.setswitchinterval(before)
        thread.join()
    return seen


@pytest.mark.parametrize("case", SINGLE_INPUT)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_fast_path_releases_the_gil_for_large_tensors(case, grad):
    """Tensors of 256 KiB or more run with the GIL released (another Python thread runs
    during the kernel, as under ATen's ops); small ones keep it, and the small case shows
    the check can fail. The C++ entry points only: swish with a tensor beta and acon_c release it
    the same way (gil_released_if_large), but their Python checks call torch ops, which
    release the GIL themselves, so this check cannot tell them apart."""
    op, _, _, functional, _ = case_args(case, torch.float32)
    big = rand_x((4, 3, 512, 512), torch.float32, "cpu").requires_grad_(grad)  # 12 MiB
    small = rand_x((4, 3, 4, 4), torch.float32, "cpu").requires_grad_(grad)
    assert _another_thread_ran_during(lambda: torch.nn.functional.silu(big))  # ATen releases it
    assert not _another_thread_ran_during(lambda: functional(small))
    assert _another_thread_ran_during(lambda: functional(big))
    assert not grad or on_fast_path(functional(big), op)


def test_op_functions_are_classes_of_the_registry():
    """Every op's Autograd kernel applies a subclass of the real classes ForwardOpFunction /
    BackwardOpFunction, one per registry entry, with the older form beside it (.plain)."""
    from fusedact import functions
    from fusedact._opinfo import OPS

    for spec in OPS:
        fwd = functions._FUNCTIONS["fusedact"][f"{spec.name}_forward"][1]
        bwd = functions._FUNCTIONS["fusedact"][f"{spec.name}_backward"][1]
        assert issubclass(fwd, functions.ForwardOpFunction) and fwd.spec is spec
        assert issubclass(bwd, functions.BackwardOpFunction) and bwd.spec is spec
        assert fwd.__name__ == OP_FN[spec.name] and bwd.__name__ == OP_FN[spec.name].replace("Op", "OpBackward", 1)
        assert issubclass(fwd.plain, torch.autograd.Function) and fwd.plain.__name__ == fwd.__name__
