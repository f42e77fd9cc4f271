"""What only a GPU can test, written before a GPU runs it (issue 12): a tensor over 2^31
elements, CUDA-graph capture and replay, a non-default stream, views that start one
element past a 16-byte boundary (the flat kernels' scalar head, the row kernels' and
channels kernels' fallbacks), for every op. Skipped without a GPU. CUDA autocast and
torch.compile with dynamic shapes (both backends, Triton's as triton_ops that inductor
sees) are the cuda parametrisations of test_autocast.py and test_compile.py, and the
check that inductor's generated code holds the Triton kernels is here;
tools/device_check.sh's `gpu` stage runs all of these, and `sanitize` runs the kernels
under compute-sanitizer."""

from __future__ import annotations

import math

import pytest
import torch

import fusedact
from fusedact import reference
from conftest import DTYPES, FUSED_BACKENDS, HAS_CUDA, HAS_TRITON, OPS, TOL, reduction_tol
from helpers import check_forward_backward, make_params, op_fn, param_terms_abs, rand_x, ref_fn

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device or CUDA kernels not built")


def _params(op, x, **kw):
    return make_params(op, x, **kw)


# ---- over 2^31 elements: the int64 flat path (grid-stride loop over tiles) and the
# row kernel's int64 offsets, checked on samples against the float64 reference.

BIG = 2**31 + 4099  # not a multiple of any pack or tile: a tail of 3 bf16 elements


def _samples(n: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n, (1 << 16,), generator=gen)
    ends = torch.tensor([0, 1, 2, 7, 8, 2**31 - 1, 2**31, 2**31 + 1] + list(range(n - 20, n)))
    return torch.cat([idx, ends]).unique().to(device)


@pytest.mark.parametrize("op", ["swish", "mish", "hard_swish"])
def test_flat_over_2_31_elements(op):
    need = 4 * BIG * 2 + (1 << 30)  # x, y, g, dx in bf16, and headroom
    if torch.cuda.get_device_properties(0).total_memory < need:
        pytest.skip("not enough GPU memory for 2^31 bf16 elements x 4")
    torch.cuda.empty_cache()
    x = torch.empty(BIG, dtype=torch.bfloat16, device="cuda").normal_(0, 3)
    y = getattr(torch.ops.fusedact, f"{op}_forward")(*([x, 1.7, None] if op == "swish" else [x]))
    g = torch.empty_like(x).normal_()
    back = getattr(torch.ops.fusedact, f"{op}_backward")
    dx = back(g, x, 1.7, None)[0] if op == "swish" else back(g, x)
    idx = _samples(BIG, "cuda")
    xs = x[idx].double().requires_grad_()
    ref = ref_fn(op)
    ys = ref(xs, 1.7) if op == "swish" else ref(xs)
    (dxs,) = torch.autograd.grad(ys, xs, g[idx].double())
    torch.testing.assert_close(y[idx].double(), ys.detach(), **TOL[torch.bfloat16])
    torch.testing.assert_close(dx[idx].double(), dxs, **TOL[torch.bfloat16])
    del x, y, g, dx


def test_acon_c_over_2_31_elements():
    """NCHW rows whose offsets pass 2^31: y and dx on samples, the parameter gradients of
    the four channels in full."""
    C, L = 4, 2**29 + 7  # 2^31 + 28 bf16 elements, runs of L
    if torch.cuda.get_device_properties(0).total_memory < 4 * C * L * 2 + (1 << 31):
        pytest.skip("not enough GPU memory")
    torch.cuda.empty_cache()
    x = torch.empty(1, C, L, dtype=torch.bfloat16, device="cuda").normal_(0, 3)
    g = torch.empty_like(x).normal_()
    p1, p2, beta = (torch.randn(C, device="cuda") * s + o for s, o in ((1, 0), (1, 0), (0.5, 1)))
    y = torch.ops.fusedact.acon_c_forward(x, p1, p2, beta, 1)
    dx, dp1, dp2, dbeta = torch.ops.fusedact.acon_c_backward(g, x, p1, p2, beta, 1)
    flat = x.view(-1)
    idx = _samples(flat.numel(), "cuda")
    c = idx // L
    xs = flat[idx].double().requires_grad_()
    d = (p1 - p2).double()[c]
    z = beta.double()[c] * d * xs
    ys = d * xs * torch.sigmoid(z) + p2.double()[c] * xs
    (dxs,) = torch.autograd.grad(ys, xs, g.view(-1)[idx].double())
    torch.testing.assert_close(y.view(-1)[idx].double(), ys.detach(), **TOL[torch.bfloat16])
    torch.testing.assert_close(dx.view(-1)[idx].double(), dxs, **TOL[torch.bfloat16])
    # The parameter gradients against the float64 reference summed over chunks, to the
    # suite's bound (conftest.reduction_tol over helpers.param_terms_abs): a few float32
    # ulp per term, a random walk of sqrt(L) ulp of sum|terms| over L terms per channel.
    params64 = [p.double().requires_grad_() for p in (p1, p2, beta)]
    ref = [torch.zeros(C, dtype=torch.float64, device="cuda") for _ in range(3)]
    terms = [torch.zeros(C, dtype=torch.float64, device="cuda") for _ in range(3)]
    step = 1 << 24
    for s in range(0, L, step):
        x64 = x[:, :, s : s + step].double()
        g64 = g[:, :, s : s + step].double()
        y64 = reference.acon_c(x64, *params64, channel_dim=1)
        for acc, gp in zip(ref, torch.autograd.grad(y64, params64, g64)):
            acc += gp
        for acc, t in zip(terms, param_terms_abs("acon_c", x64, g64, [p.detach() for p in params64], 1)):
            acc += t
        del x64, g64, y64
    for j, got in enumerate((dp1, dp2, dbeta)):
        tol = reduction_tol(terms[j], L, torch.bfloat16, torch.float32, ref[j])
        err = (got.double() - ref[j]).abs()
        assert bool((err <= tol).all()), (j, err, tol)


# ---- CUDA graphs: the ops capture (no host sync, no allocation outside the graph's
# pool) and a replay on new input values gives the eager result.


@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_capture_and_replay(op):
    x = rand_x((4, 8, 13, 11), torch.float32, "cuda").requires_grad_()
    params = [p.requires_grad_() if isinstance(p, torch.Tensor) else p for p in _params(op, x)]
    f = op_fn(op)
    g = torch.randn_like(x)
    leaves = [x] + [p for p in params if isinstance(p, torch.Tensor)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up on a side stream, as the CUDA-graph docs do
        for _ in range(2):
            torch.autograd.grad(f(x, *params), leaves, g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = f(x, *params)
        grads = torch.autograd.grad(y, leaves, g)
    with torch.no_grad():
        x.copy_(rand_x(x.shape, x.dtype, "cuda", seed=5))
    graph.replay()
    torch.cuda.synchronize()
    y_eager = f(x, *params)
    grads_eager = torch.autograd.grad(y_eager, leaves, g)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- a non-default stream: the kernels run on the current stream, so results made on
# a side stream are right when that stream is waited for, with no device-wide sync.


@pytest.mark.parametrize("op", OPS)
def test_non_default_stream(op):
    x = rand_x((3, 16, 33, 35), torch.bfloat16, "cuda")
    params = _params(op, x)
    f = op_fn(op)
    expected = f(x, *params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # a long kernel first, so a launch on the wrong stream would read unwritten data
        big = torch.randn(1 << 26, device="cuda")
        x2 = x * 1.0 + (big.sum() * 0).to(x.dtype)
        y = f(x2, *params)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


# ---- misaligned views: x starting one element past a 16-byte boundary, and x, g and
# out misaligned differently (the packed path needs equal heads).


@pytest.mark.parametrize("layout", ["flat", "nchw", "channels_last"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_misaligned_views(op, dtype, layout, backend):
    shape = {"flat": (3 * 4096 + 5,), "nchw": (2, 3, 17, 19), "channels_last": (2, 16, 7, 9)}[layout]
    if op == "acon_c" and layout == "flat":
        shape = (5, 4099)  # (N, C) with C = 4099, channel_dim=1: inner == 1
    n = math.prod(shape)
    buf = rand_x((n + 1,), dtype, "cuda")
    x = buf[1:].view(shape)
    if layout == "channels_last":
        x = buf[1:].view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    assert x.data_ptr() % 16 != 0
    check_forward_backward(op, x, _params(op, x), backend=backend)
    if layout == "flat" and op != "acon_c":
        # g misaligned by a different amount than x: the scalar path
        g_buf = rand_x((n + 2,), dtype, "cuda", seed=3)
        g = g_buf[2:].view(shape)
        f = op_fn(op, backend)
        xl = x.detach().requires_grad_()
        (dx,) = torch.autograd.grad(f(xl), xl, g)
        x64 = x.double().requires_grad_()
        (dx64,) = torch.autograd.grad(ref_fn(op)(x64), x64, g.double())
        torch.testing.assert_close(dx.double(), dx64, **TOL[dtype])


# ---- the Triton backend under torch.compile on a GPU: its ops are triton_ops, so
# inductor puts their kernels into the code it generates (under the CPU interpreter they
# are opaque custom ops), and dynamic shapes compile once.


@pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")
def test_triton_kernels_inside_inductor_code_with_dynamic_shapes():
    from torch._inductor.utils import run_and_get_code

    def f(x):
        return fusedact.mish(x, backend="triton") * 2.0

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    x = torch.randn(1000, device="cuda")
    y, code = run_and_get_code(compiled, x)
    assert "_mish_fwd_kernel" in "\n".join(code), "inductor did not see the Triton kernel"
    torch.testing.assert_close(y.double(), reference.mish(x.double()) * 2, **TOL[torch.float32])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1537, 4099):
            x = torch.randn(n, device="cuda")
            torch.testing.assert_close(compiled(x).double(), reference.mish(x.double()) * 2, **TOL[torch.float32])
