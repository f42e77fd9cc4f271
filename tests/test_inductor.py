"""torch.compile's choice between our kernels and Inductor's fusion (fusedact.config.compile,
fusedact/_inductor.py): the decompositions compute docs/SPEC.md's functions with the kernels'
edge conventions, "fuse" leaves no fused op in Inductor's code and "kernel" all of them,
"auto" follows its table, the setting is checked, guarded and part of the cache key, and
a fused Conv-BN-SiLU block saves what the same block with F.silu saves."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import fusedact
from conftest import DEVICES, HAS_TRITON, TOL, make_layout
from fusedact import _inductor
from helpers import compile_mode
from fusedact._numerics import check_close, make_params, param_terms_abs, rand_x, reduction_tol, ref_fn, to64

OPS = ["swish", "swish_beta_tensor", "mish", "hard_swish", "acon_c", "acon_c_per_sample"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# every kink, threshold and saturation of activation_math.h, and the non-finite values
CORNERS = [
    0.0,
    -0.0,
    3.0,
    -3.0,
    2.999,
    -2.999,
    20.0,
    19.99,
    40.0,
    -20.0,
    88.0,
    -88.0,
    128.0,
    -128.0,
    1e-30,
    -1e-30,
    1e20,
    -1e20,
    float("inf"),
    float("-inf"),
    float("nan"),
]


def op_args(case, x):
    """(base op name, the forward op's arguments after x) for a case of OPS."""
    if case == "swish":
        return "swish", (1.7, None)
    if case == "swish_beta_tensor":
        return "swish", (1.0, make_params("swish", x)[0])
    if case.startswith("acon_c"):
        return "acon_c", (*make_params("acon_c", x, per_sample=case.endswith("per_sample")), 1)
    return case, ()


def inputs(case, dtype, layout, device="cpu"):
    x = rand_x((3, 5, 4, 6), dtype, device)
    flat = x.view(-1)
    corners = torch.tensor(CORNERS, dtype=torch.float64).to(dtype)
    flat[: len(CORNERS)] = corners.to(device)
    return make_layout(x, layout)


def kernel_call(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return getattr(torch.ops.fusedact, op)(*args)


def as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OPS)
def test_decompositions_match_the_kernels(case, dtype, layout):
    """Each decomposition, run eagerly, against our kernel on the same arguments: the
    same NaNs, infinities and zero signs at every corner (both follow activation_math.h
    op for op), and everywhere within the dtype's tolerance of each other; parameter
    gradients within the bound of a float32 (float64) sum."""
    x = inputs(case, dtype, layout)
    op, rest = op_args(case, x)
    g = rand_x(x.shape, dtype, "cpu", seed=3, scale=1.0)
    for name, args in ((f"{op}_forward", (x, *rest)), (f"{op}_backward", (g, x, *rest))):
        got = as_list(_inductor.DECOMPOSITIONS[name](*args))
        want = as_list(kernel_call(name, *args))
        assert len(got) == len(want)
        for k, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, k)
            if a.numel() == 0:
                continue
            if k == 0:  # y or dx: elementwise
                n = len(CORNERS)
                ca, cb = a.flatten()[:n], b.flatten()[:n]
                if name == "hard_swish_backward":  # aten's form (_inductor.py says why): at x = NaN,
                    nan_x = args[1].flatten()[:n].isnan()  # g (Inductor; ATen's vector loop) or NaN
                    g_at = args[0].flatten()[:n][nan_x]
                    assert bool(((ca[nan_x] == g_at) | ca[nan_x].isnan()).all()), ca
                    ca, cb = ca[~nan_x], cb[~nan_x]
                    a, b = a.masked_fill(args[1].isnan(), 0), b.masked_fill(args[1].isnan(), 0)
                assert torch.equal(ca.isnan(), cb.isnan()), (name, ca, cb)
                finite = ~cb.isnan()
                assert torch.equal(ca[finite].isinf(), cb[finite].isinf()), (name, ca, cb)
                if op == "hard_swish":  # its -0.0 is a convention; elsewhere a zero's sign is
                    zero = cb == 0  # that of a flushed ~1e-37 (SPEC: may flush to zero)
                    assert torch.equal(ca[zero].signbit(), cb[zero].signbit()), (name, ca, cb)
                torch.testing.assert_close(a, b, equal_nan=True, **TOL[dtype])
            else:  # a parameter gradient: a sum over x's finite elements
                assert torch.equal(a.isnan(), b.isnan()), (name, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", OPS)
def test_decompositions_against_float64(case, dtype):
    """On finite inputs, the decompositions' y, dx and parameter gradients against the
    float64 reference with the tolerances the kernels are held to (fusedact.testing)."""
    x = rand_x((4, 6, 5, 3), dtype, "cpu")
    op, rest = op_args(case, x)
    g = rand_x(x.shape, dtype, "cpu", seed=3, scale=1.0)
    params = [p for p in rest if isinstance(p, torch.Tensor)]
    cd = 1
    ref = ref_fn(op, cd)
    leaves64 = [to64(t) for t in (x, *params)]
    if op == "swish":
        y64 = ref(leaves64[0], leaves64[1] if len(leaves64) > 1 else rest[0])
    else:
        y64 = ref(*leaves64)
    grads64 = torch.autograd.grad(y64, leaves64, g.double())
    y = _inductor.DECOMPOSITIONS[f"{op}_forward"](x, *rest)
    check_close(y, y64.detach())
    back = as_list(_inductor.DECOMPOSITIONS[f"{op}_backward"](g, x, *rest))
    check_close(back[0], grads64[0])
    got_params = [t for t in back[1:] if t.numel()]
    assert len(got_params) == len(params)
    if params:
        terms = param_terms_abs(op, leaves64[0].detach(), g.double(), [p.detach() for p in leaves64[1:]], cd)
        for gp, gp64, p, t in zip(got_params, grads64[1:], params, terms):
            assert gp.dtype == p.dtype and gp.shape == p.shape
            tol = reduction_tol(t, max(1, x.numel() // p.numel()), x.dtype, p.dtype, gp64)
            assert bool(((gp.double() - gp64).abs() <= tol + 1e-300).all())


def fused_ops_in(codes, namespace="fusedact") -> set[str]:
    return {m for code in codes for m in re.findall(rf"torch\.ops\.{namespace}\.(\w+)", code)}


class EveryOp(nn.Module):
    """Every fused op on an input of its own, each scaled by 2 after it (an exact
    operation for Inductor to fuse with), so that compiled and eager round alike."""

    def __init__(self, backend="native"):
        super().__init__()
        self.backend = backend
        self.beta = nn.Parameter(torch.tensor([1.3]))
        self.p1, self.p2, self.b = (nn.Parameter(torch.randn(4)) for _ in range(3))

    def forward(self, xs):
        b = self.backend
        return (
            fusedact.swish(xs[0], 0.5, backend=b) * 2,
            fusedact.swish(xs[1], self.beta, backend=b) * 2,
            fusedact.mish(xs[2], backend=b) * 2,
            fusedact.hard_swish(xs[3], backend=b) * 2,
            fusedact.acon_c(xs[4], self.p1, self.p2, self.b, backend=b) * 2,
        )


def every_op_inputs(device, dtype=torch.float32):
    torch.manual_seed(1)
    return [(3 * torch.randn(2, 4, 5, 6, device=device)).to(dtype).requires_grad_() for _ in range(5)]


def step_of(model, xs):
    ys = model(xs)
    grads = torch.autograd.grad(ys, [*xs, *model.parameters()], [torch.ones_like(y) for y in ys])
    return ys, grads


def compiled_step(model, xs, mode):
    torch._dynamo.reset()
    with compile_mode(mode):
        compiled = torch.compile(model, fullgraph=True)
        (ys, grads), codes = run_and_get_code(lambda: step_of(compiled, xs))
    return ys, grads, codes


EXPECTED = {  # which ops Inductor's code still calls, by mode
    "fuse": lambda device: set(),
    "kernel": lambda device: {
        f"{op}_{d}" for op in ("swish", "mish", "hard_swish", "acon_c") for d in ("forward", "backward")
    },
    "auto": lambda device: {
        f"{op}_{d}" for op, m in _inductor.AUTO[device].items() if m == "kernel" for d in ("forward", "backward")
    },
}


def assert_step_close(got, want, dtype, n_terms):
    """y and dx (elementwise: the dtype's tolerance), parameter gradients (float32 sums of
    n_terms terms of magnitude <= 16 (|x| <= 4 sigma, g = 2) in another order: n eps32 16)."""
    (ys, grads), (ys_e, grads_e) = got, want
    n_x = len(ys)
    for a, b in zip(list(ys) + list(grads[:n_x]), list(ys_e) + list(grads_e[:n_x])):
        torch.testing.assert_close(a, b, **TOL[dtype])
    atol = n_terms * torch.finfo(torch.float32).eps * 16
    for a, b in zip(grads[n_x:], grads_e[n_x:]):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["fuse", "kernel", "auto"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_code_follows_the_mode(device, mode, dtype, monkeypatch):
    """Inductor's forward and backward code call exactly the ops the mode keeps, and the
    compiled step equals the eager one within the dtype's tolerance. "auto" runs with a
    table that keeps acon_c a kernel (the shipped one fuses everything on the CPU)."""
    if mode == "auto":
        monkeypatch.setitem(_inductor.AUTO[device], "acon_c", "kernel")
    torch.manual_seed(0)
    model = EveryOp().to(device)
    xs = every_op_inputs(device, dtype)
    ys, grads, codes = compiled_step(model, xs, mode)
    assert fused_ops_in(codes) == EXPECTED[mode](device)
    assert_step_close((ys, grads), step_of(model, xs), dtype, xs[0].numel())


@pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")
@pytest.mark.parametrize("mode", ["fuse", "kernel"])
def test_triton_ops_follow_the_mode(mode):
    """The Triton namespace's ops have the same decompositions (here, under the
    interpreter, plain custom ops that Inductor calls as fallbacks in "kernel")."""
    if not os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    torch.manual_seed(0)
    model = EveryOp("triton").to(device)
    xs = every_op_inputs(device)
    ys, grads, codes = compiled_step(model, xs, mode)
    found = fused_ops_in(codes, "fusedact_triton")
    if mode == "fuse":
        assert found == set()
    elif device == "cpu":  # on a GPU, triton_ops are traced into: their kernels, not op calls
        assert found == EXPECTED["kernel"](device)
    assert_step_close((ys, grads), step_of(model, xs), torch.float32, xs[0].numel())


TRITON_OP_SCRIPT = r"""
import os, re, sys
import torch, fusedact
from torch._inductor.utils import run_and_get_code
assert not fusedact.triton.ops.INTERPRET
assert type(torch.ops.fusedact_triton.mish_forward.default)  # triton_op
fusedact.config.compile = "fuse"
torch.manual_seed(0)
p = [torch.randn(4, requires_grad=True) for _ in range(3)]
beta = torch.tensor([1.2], requires_grad=True)
def f(x):
    b = "triton"
    return (fusedact.swish(x, 0.5, backend=b) * 2 + fusedact.swish(x, beta, backend=b) + fusedact.mish(x, backend=b)
            + fusedact.hard_swish(x, backend=b) + fusedact.acon_c(x, *p, backend=b))
def g(x):
    b = "eager"
    return (fusedact.swish(x, 0.5, backend=b) * 2 + fusedact.swish(x, beta, backend=b) + fusedact.mish(x, backend=b)
            + fusedact.hard_swish(x, backend=b) + fusedact.acon_c(x, *p, backend=b))
x = torch.randn(2, 4, 5, 6, requires_grad=True)
c = torch.compile(f, fullgraph=True)
def step(fn):
    y = fn(x)
    return y, torch.autograd.grad(y.sum(), [x, beta, *p])
(y, gr), codes = run_and_get_code(lambda: step(c))
found = {m for code in codes for m in re.findall(r"fusedact_triton\.\w+|triton_kernel_wrapper\w*", code)}
y_e, gr_e = step(g)
torch.testing.assert_close(y, y_e, rtol=1e-5, atol=1e-5)
for a, b_ in zip(gr, gr_e):
    torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)
print("found", sorted(found), len(codes))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")
def test_triton_op_bodies_fuse():
    """Outside the interpreter the Triton ops are triton_ops, which AOT autograd traces
    into before Inductor's table is asked: in "fuse" their bodies return the
    decomposition. Shown on CPU tensors in a fresh process without TRITON_INTERPRET,
    where a Triton launch cannot run (with "kernel" the same script fails): the compiled
    step runs, calls no Triton op or kernel, and equals the eager backend's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", CI="1")
    out = subprocess.run([sys.executable, "-c", TRITON_OP_SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "found [] 2" in out.stdout, out.stdout


def saved_storage_bytes(fn):
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


class Block(nn.Module):  # conv -> BatchNorm (train) -> SiLU -> residual add, as in the issue
    def __init__(self, act, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = act

    def forward(self, x):
        return x + self.act(self.bn(self.conv(x)))


@pytest.mark.parametrize("act", ["swish", "mish", "hard_swish"])
def test_fused_block_saves_what_the_original_saves(act):
    """Compiled, a chain of three Conv-BN-act blocks with our op in "fuse" saves exactly
    the bytes the chain with torch's activation saves (Inductor recomputes each BatchNorm
    output); with "kernel" each block saves the activation's input on top (the issue's 2
    vs 3 tensors). Three blocks, not one: a constant that AOT shares between blocks (a
    select against a Python scalar in mish's decomposition did) makes the partitioner
    save a tensor of every block after the first."""
    n_blocks = 3

    def chain(make_act):
        return nn.Sequential(*[Block(make_act()) for _ in range(n_blocks)])

    theirs = {"swish": nn.SiLU, "mish": nn.Mish, "hard_swish": nn.Hardswish}[act]
    ours = {"swish": fusedact.nn.Swish, "mish": fusedact.nn.Mish, "hard_swish": fusedact.nn.HardSwish}[act]
    torch.manual_seed(0)
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    saved = {}
    for label, make_act, mode in (("torch", theirs, "auto"), ("fuse", ours, "fuse"), ("kernel", ours, "kernel")):
        torch._dynamo.reset()
        with compile_mode(mode):
            compiled = torch.compile(chain(make_act), fullgraph=True)
            compiled(x).sum().backward()  # compiles, outside the hooks
            saved[label], _ = saved_storage_bytes(lambda: compiled(x))
    act_bytes = x.numel() * x.element_size()
    assert saved["fuse"] == saved["torch"], saved
    # kernel: each BatchNorm output too, less a per-channel vector of the fused graph's
    assert saved["kernel"] >= saved["torch"] + n_blocks * (act_bytes - x.shape[1] * 8), saved


def _generated(codes: list[str]) -> list[str]:
    """Inductor's code up to names: kernel names (they list the ops a kernel fused, so
    ours read swish_forward where torch's read silu) and comments dropped."""
    out = []
    for code in codes:
        code = re.sub(r"cpp_fused_\w+", "kernel", code)
        code = re.sub(r"/tmp/\S+", "", code)
        out.append("\n".join(line for line in code.splitlines() if not line.strip().startswith("#")))
    return out


def _yolo_blocks():
    conv = pytest.importorskip("ultralytics.nn.modules")
    return nn.Sequential(conv.Conv(3, 8, 3, 2), conv.C3k2(8, 16, 1, False, 0.25), conv.Conv(16, 16, 3, 2))


def _timm_blocks():
    layers = pytest.importorskip("timm.layers")
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),
        layers.BatchNormAct2d(8, act_layer=nn.SiLU),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
        layers.BatchNormAct2d(8, act_layer=nn.SiLU),
    )


@pytest.mark.parametrize("make", [_yolo_blocks, _timm_blocks], ids=["ultralytics", "timm"])
def test_converted_silu_blocks_compile_to_the_original_code(make):
    """Under "auto", a converted model whose activations are SiLU (ultralytics' Conv and
    C3k2, timm's BatchNormAct2d: YOLO11n, EfficientNet-B0) compiles to the very code the
    original compiles to, forward and backward: the same kernels, the same saved
    tensors, so the same speed (issue 20: never slower than the compiled original)."""
    torch.manual_seed(0)
    original = make().train()
    converted = fusedact.convert(copy.deepcopy(original))
    assert any(isinstance(m, fusedact.nn.BatchNormAct2d) for m in converted.modules())
    x = torch.randn(2, 3, 32, 32)
    codes = {}
    for label, model in (("original", original), ("converted", converted)):
        torch._dynamo.reset()
        with compile_mode("auto"):
            compiled = torch.compile(model, fullgraph=True)
            _, code = run_and_get_code(lambda: compiled(x).square().mean().backward())
        assert len(code) == 2  # forward and backward
        codes[label] = _generated(code)
    assert codes["converted"] == codes["original"]


class EagerAconC(nn.Module):  # YOLOv5's AconC, what a user compiles before convert
    def __init__(self, c):
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, c, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(self.beta * dpx) + self.p2 * x


def test_acon_block_keeps_the_layout():
    """A compiled BatchNorm + AconC step on channels_last x (the layout Inductor gives a
    conv's output on the CPU) transposes no more tiles with our decomposition than with
    YOLOv5's eager module: in activation_math.h's form, Inductor realized NCHW
    intermediates and the step ran 2.2x slower (benchmarks/NOTES.md)."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 16, 16).to(memory_format=torch.channels_last).requires_grad_()
    counts = {}
    for label, act in (("eager", EagerAconC(32)), ("ours", fusedact.nn.AconC(32))):
        torch._dynamo.reset()
        block = nn.Sequential(nn.BatchNorm2d(32), act)
        with compile_mode("fuse"):
            compiled = torch.compile(block, fullgraph=True)
            _, codes = run_and_get_code(lambda: compiled(x).sum().backward())
        assert not fused_ops_in(codes)
        counts[label] = sum(code.count("transpose_mxn") for code in codes)
    assert counts["ours"] <= counts["eager"], counts


def test_mode_change_recompiles():
    """Dynamo guards on the setting: a compiled function compiles again when it changes."""
    torch._dynamo.reset()
    f = torch.compile(lambda x: fusedact.mish(x) * 2, fullgraph=True)
    x = torch.randn(8)
    with compile_mode("fuse"):
        _, codes = run_and_get_code(f, x)
        assert fused_ops_in(codes) == set()
    with compile_mode("kernel"):
        _, codes = run_and_get_code(f, x)
        assert fused_ops_in(codes) == {"mish_forward"}


def test_auto_table_covers_every_op():
    for device in ("cpu", "cuda"):
        assert set(_inductor.AUTO[device]) == {"swish", "mish", "hard_swish", "acon_c"}
        assert set(_inductor.AUTO[device].values()) <= {"fuse", "kernel"}
        assert set(_inductor.AUTO_BLOCKS[device]) == {"batch_norm_act"}
        assert set(_inductor.AUTO_BLOCKS[device].values()) <= {"fuse", "kernel"}


def test_setting_is_checked_and_keys_the_caches():
    with pytest.raises(ValueError, match="fusedact.config.compile"):
        fusedact.config.compile = "fast"
    assert fusedact.config.compile == "auto"
    before = torch.compiler.config.cache_key_tag
    try:
        torch.compiler.config.cache_key_tag = "mine"
        with compile_mode("fuse"):
            tags = torch.compiler.config.cache_key_tag.split("|")
            assert tags[0] == "mine" and tags[1].startswith("fusedact.compile=fuse:") and len(tags) == 2
        assert torch.compiler.config.cache_key_tag.split("|")[1].startswith("fusedact.compile=auto:")
    finally:
        torch.compiler.config.cache_key_tag = before
        fusedact.config.compile = "auto"


def test_environment_variable():
    code = "import fusedact; print(fusedact.config.compile)"
    env = dict(os.environ, FUSEDACT_COMPILE="kernel")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "kernel"
    env["FUSEDACT_COMPILE"] = "nope"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FUSEDACT_COMPILE must be one of" in bad.stderr
