"""Forward and backward parity with the float64 reference: op x dtype x device x shape
x layout, plus acon_c's parameter layouts, channel_dim and mixed precision."""

from __future__ import annotations

import math
import mmap
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedact
from conftest import DEVICES, DTYPES, FUSED_BACKENDS, LAYOUTS, OPS, TOL, make_layout
from helpers import (
    at_a_page_end,
    check_close,
    check_forward_backward,
    make_params,
    op_fn,
    rand_x,
    ref_fn,
    same_bits,
)

# empty, one element, odd sizes, 1-D to 5-D, and sizes above the CPU parallel grain
# (32768 elements) and the reduction segment (16384 elements per channel run).
SHAPES = [(0,), (1,), (7,), (33, 17), (3, 5, 7), (2, 3, 129, 131), (2, 3, 4, 5, 6), (3 * 32768 + 5,)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_parity(op, dtype, device, shape, layout, backend):
    if backend == "triton" and device == "cpu" and math.prod(shape) > 2**17:
        pytest.skip("Triton's interpreter is slow; the 1-D shape above the CPU grain adds nothing for Triton")
    x = rand_x(shape, dtype, device)
    x = make_layout(x, layout)
    channel_dim = 1 if len(shape) >= 2 else 0
    params = make_params(op, x, channel_dim=channel_dim)
    check_forward_backward(op, x, params, channel_dim=channel_dim, backend=backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_isa(op, dtype, cpu_isa):
    """The AVX-512, AVX2 and baseline builds of the CPU loops all meet the contract;
    1-D sizes around the loops' 1 KiB output blocks (256 float32, 512 float16/bfloat16
    elements) and their vector widths; swish at beta = 1 (its own loop) and 1.7."""
    for layout in ("contiguous", "channels_last"):
        x = make_layout(rand_x((2, 5, 37, 41), dtype, "cpu"), layout)
        check_forward_backward(op, x, make_params(op, x))
        check_forward_backward(op, x, make_params(op, x, per_sample=True) if op == "acon_c" else make_params(op, x))
    for n in (1, 15, 17, 255, 257, 511, 512, 513, 1024 + 31):
        x = rand_x((n,), dtype, "cpu")
        params = make_params(op, x, channel_dim=0, learnable_beta=False)
        check_forward_backward(op, x, params, channel_dim=0)
        if op == "swish":
            check_forward_backward(op, x, [1.0], channel_dim=0)


@pytest.mark.parametrize("module_layout", [False, True], ids=["(C,)", "(1,C,1,1)"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per-channel", "per-sample"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_acon_c_params(device, dtype, layout, per_sample, module_layout, backend):
    """ACON-C and Meta-ACON beta, in both parameter layouts, over NCHW-like layouts;
    a channel run longer than a reduction segment (130 * 131 > 16384)."""
    for shape in [(3, 6, 9, 11), (2, 4, 130, 131), (5, 1, 3, 3), (1, 3, 2, 2)]:
        x = make_layout(rand_x(shape, dtype, device), layout)
        params = make_params("acon_c", x, per_sample=per_sample, module_layout=module_layout)
        check_forward_backward("acon_c", x, params, backend=backend)


@pytest.mark.parametrize("per_sample", [False, True], ids=["per-channel", "per-sample"])
@pytest.mark.parametrize("shape", [(4, 9, 16), (2, 7, 3000), (3, 1, 5), (600, 70)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_acon_c_channel_last_dim(device, dtype, shape, per_sample, backend):
    """(N, L, C) inputs with channel_dim=-1: rows of C channels."""
    x = rand_x(shape, dtype, device)
    params = make_params("acon_c", x, channel_dim=-1, per_sample=per_sample)
    check_forward_backward("acon_c", x, params, channel_dim=-1, backend=backend)


@pytest.mark.parametrize("op", ["swish", "acon_c"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_mixed_precision(device, dtype, op, backend):
    """float16/bfloat16 x with float32 parameters, as autocast leaves them: output and
    dx in x's dtype, parameter gradients in float32, math in float32."""
    for layout in ("contiguous", "channels_last"):
        x = make_layout(rand_x((3, 8, 17, 19), dtype, device), layout)
        params = make_params(op, x, param_dtype=torch.float32, per_sample=(layout == "channels_last"))
        y, grads = check_forward_backward(op, x, params, backend=backend)
        assert y.dtype == dtype and grads[0].dtype == dtype
        assert all(g.dtype == torch.float32 for g in grads[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_matches_torch_functional(device, dtype, backend):
    """swish at beta = 1 is F.silu, mish is F.mish, hard_swish is F.hardswish, forward and
    backward, for finite inputs. hard_swish in float64 on the CPU is bit-for-bit torch's
    below 3 and in its gradient; from 3 on it is x itself (docs/SPEC.md), where torch's
    x * 6 / 6 can be an ulp off. torch's CUDA forward multiplies by a float32 1/6
    (relative error 3e-8, inside float64's rtol of 1e-7 used below), so there only the
    gradient is bit-for-bit."""
    x = rand_x((4, 3, 33, 35), dtype, device, scale=4.0)
    # include the kinks of hard_swish and values around them
    x.view(-1)[:6] = torch.tensor([-3.0, 3.0, -2.5, 2.5, -4.0, 4.0], dtype=dtype)
    g = rand_x(x.shape, dtype, device, seed=5, scale=1.0)
    for ours, theirs in [
        (lambda t: fusedact.swish(t, 1.0, backend=backend), F.silu),
        (lambda t: fusedact.mish(t, backend=backend), F.mish),
        (lambda t: fusedact.hard_swish(t, backend=backend), F.hardswish),
    ]:
        a = x.detach().requires_grad_()
        b = x.detach().requires_grad_()
        ya, yb = ours(a), theirs(b)
        (ga,), (gb,) = torch.autograd.grad(ya, a, g), torch.autograd.grad(yb, b, g)
        if theirs is F.hardswish and dtype == torch.float64:
            below = x < 3
            assert torch.equal(ga, gb)
            if device == "cpu":
                assert torch.equal(ya[below], yb[below])
            assert torch.equal(ya[~below], x[~below])
        # both are within the tolerance of the float64 truth, so of each other twice over
        torch.testing.assert_close(ya.double(), yb.double(), rtol=2 * TOL[dtype]["rtol"], atol=2 * TOL[dtype]["atol"])
        torch.testing.assert_close(ga.double(), gb.double(), rtol=2 * TOL[dtype]["rtol"], atol=2 * TOL[dtype]["atol"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hard_swish_kink_convention_is_torch(device, backend):
    """docs/SPEC.md says PyTorch's gradient is 0 at x = -3 and 1 at x = 3; check that against
    the installed torch, and that we do the same."""
    x = torch.tensor([-3.0, 3.0, -3.0001, 2.9999], dtype=torch.float64, device=device)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(F.hardswish(a).sum(), a)
    (gb,) = torch.autograd.grad(fusedact.hard_swish(b, backend=backend).sum(), b)
    assert ga[0].item() == 0.0 and ga[1].item() == 1.0, f"torch changed its convention: {ga}"
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("op", OPS)
def test_eager_backend(op):
    """backend='eager' is the reference, with the same signature."""
    x = rand_x((2, 3, 4, 5), torch.float32, "cpu")
    params = make_params(op, x)
    check_close(op_fn(op, "eager")(x, *params).double(), ref_fn(op)(x, *params).double())


@pytest.fixture(params=["streaming", "cached"])
def cpu_stores(request):
    """Runs a test with the CPU loops' outputs always written with non-temporal stores,
    then never (the auto rule picks one by size and by whether the pages are in)."""
    before = fusedact._C.cpu_stores()
    fusedact._C.set_cpu_stores(request.param)
    yield request.param
    fusedact._C.set_cpu_stores(before)


def _store_cases(op, dtype):
    """Flat sizes around the 1 KiB blocks and above the parallel grain; acon_c's channel
    runs (NCHW maps of odd length start at every alignment) and channels_last rows."""
    for n in (1, 17, 255, 257, 513, 1024 + 31, 3 * 32768 + 5):
        x = rand_x((n,), dtype, "cpu")
        yield x, make_params(op, x, channel_dim=0, learnable_beta=False), 0
    if op in ("acon_c", "swish"):  # swish's tensor beta takes the channel loops
        for layout in ("contiguous", "channels_last"):
            x = make_layout(rand_x((2, 3, 37, 41), dtype, "cpu"), layout)
            yield x, make_params(op, x), 1
        x = rand_x((2, 3, 130, 131), dtype, "cpu")  # channel runs longer than a segment
        yield x, make_params(op, x), 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_store_paths(op, dtype, cpu_stores, cpu_isa):
    """Both ways of writing outputs (non-temporal stores through an aligned block, and
    plain stores), with every instruction set, forward and backward against float64
    (bit for bit against each other: test_cpu_values_do_not_depend_on_the_code_path)."""
    for x, params, channel_dim in _store_cases(op, dtype):
        check_forward_backward(op, x, params, channel_dim=channel_dim)


def _values_and_dx(op, x, params, g, channel_dim=1):
    f = op_fn(op, "native", channel_dim=channel_dim)
    xl = x.detach().requires_grad_()
    y = f(xl, *params)
    (dx,) = torch.autograd.grad(y, xl, g)
    return y.detach(), dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS + ["swish-tensor-beta"])
def test_cpu_values_do_not_depend_on_the_code_path(op, dtype, cpu_isa):
    """An element's y and dx depend on its inputs alone, bit for bit: not on where in a
    task it falls, not on the store way, not on the thread count, as ATen's own
    elementwise kernels. Offsets 1..17 into the same data, and pieces of 1 to 100
    elements at offsets 0..17 (shorter than a vector, tails of every length; acon_c's
    runs of a channel as short), move every element between places in a vector, the tail
    and the head before the streamed blocks; float16 blocks are converted with F16C and
    the rest in lane operations, which must agree. With AVX2/AVX-512 every element goes
    through the vector code (stores.h, store_all): GCC's scalar epilogue rounded some
    products apart from it (mish's dx and acon_c's y in float32 at AVX-512, 1 ulp)."""
    tensor_beta = op == "swish-tensor-beta"
    op = "swish" if tensor_beta else op
    # acon_c (2, 3, L) with per-channel parameters: runs of L along a channel, sliced
    # along L; the rest 1-D above twice the parallel grain (32768), so 2 threads split it.
    shape = (2, 3, 2 * 4099) if op == "acon_c" else (2 * 32768 + 1000,)
    x = rand_x(shape, dtype, "cpu", scale=4.0)
    x[..., :11] = torch.tensor(
        [-3.0, 3.0, -0.0, 0.0, 20.0, -20.0, 88.0, -88.0, math.inf, -math.inf, math.nan], dtype=dtype
    )
    g = rand_x(shape, dtype, "cpu", seed=3)
    params = make_params(op, x, channel_dim=x.dim() - 2 if op == "acon_c" else 0, learnable_beta=tensor_beta)
    y, dx = _values_and_dx(op, x, params, g)

    before = (torch.get_num_threads(), fusedact._C.cpu_stores())
    try:
        for offset in (1, 2, 3, 5, 8, 13, 17):
            ys, dxs = _values_and_dx(op, x[..., offset:].contiguous(), params, g[..., offset:].contiguous())
            assert same_bits(ys, y[..., offset:]), f"y at offset {offset}"
            assert same_bits(dxs, dx[..., offset:]), f"dx at offset {offset}"
        for stores in ("cached", "streaming"):
            fusedact._C.set_cpu_stores(stores)
            for a in range(18):
                # (2, 3, 1) is not a run of 1 but rows of 3 channels (inner 1): channels_last's
                # loop, where an element's place is its channel's (below a vector, scalar code)
                for n in (1, 2, 7, 15, 16, 17, 31, 33, 100)[op == "acon_c" or tensor_beta :]:
                    ys, dxs = _values_and_dx(op, x[..., a : a + n].contiguous(), params, g[..., a : a + n].contiguous())
                    assert same_bits(ys, y[..., a : a + n]), f"y[{a}:{a + n}], {stores} stores"
                    assert same_bits(dxs, dx[..., a : a + n]), f"dx[{a}:{a + n}], {stores} stores"
        for threads, stores in ((1, "cached"), (1, "streaming"), (2, "cached"), (2, "streaming")):
            torch.set_num_threads(threads)
            fusedact._C.set_cpu_stores(stores)
            ys, dxs = _values_and_dx(op, x, params, g)
            assert same_bits(ys, y), f"y with {threads} threads, {stores} stores"
            assert same_bits(dxs, dx), f"dx with {threads} threads, {stores} stores"
    finally:
        torch.set_num_threads(before[0])
        fusedact._C.set_cpu_stores(before[1])


@pytest.mark.parametrize("per_sample", [False, True], ids=["per-channel", "per-sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_acon_c_values_do_not_depend_on_the_layout(dtype, per_sample, cpu_isa):
    """acon_c's y and dx are the same bits in NCHW, channels_last and (N, L, C) with
    channel_dim=-1: channels_last goes row by row (rows of C channels, by chunks held in
    registers where a row is one; rows under a vector as tiled pieces), NCHW by runs of
    H*W along a channel (test_batch_norm_act.py,
    test_an_elements_bits_do_not_depend_on_the_layout)."""
    small = (1, 3, 4, 6, 7, 8, 12, 14, 15)
    cases = [(C, 7, 9) for C in small] + [(C, 16, 20) for C in small + (16, 17, 24, 32, 33, 40, 64, 80)]
    for C, H, W in cases:
        shape = (2, C, H, W)
        x = rand_x(shape, dtype, "cpu", seed=C, scale=4.0)
        g = rand_x(shape, dtype, "cpu", seed=C + 1)
        params = make_params("acon_c", x, per_sample=per_sample, seed=C)
        y, dx = _values_and_dx("acon_c", x, params, g)
        cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, g)]
        ys, dxs = _values_and_dx("acon_c", cl[0], params, cl[1])
        assert same_bits(ys.contiguous(), y) and same_bits(dxs.contiguous(), dx), f"channels_last, C={C}"
        rows = [t.permute(0, 2, 3, 1).reshape(2, H * W, C).contiguous() for t in (x, g)]
        yr, dxr = (
            t.reshape(2, H, W, C).permute(0, 3, 1, 2).contiguous()
            for t in _values_and_dx("acon_c", rows[0], params, rows[1], channel_dim=-1)
        )
        assert same_bits(yr, y) and same_bits(dxr, dx), f"(N, L, C), C={C}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect, through ctypes")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_cpu_loops_read_nothing_past_the_end(op, dtype, cpu_isa):
    """x and g end where an unreadable page begins: runs shorter than a vector (copied
    into a zero-padded one by masked loads) and tails of every length read no element
    past n, and give the values of the same data elsewhere. acon_c as (1, 1, n): one
    channel's run."""
    for n in list(range(1, 34)) + [100]:
        shape = (1, 1, n) if op == "acon_c" else (n,)
        x = rand_x(shape, dtype, "cpu", scale=4.0, seed=n)
        g = rand_x(shape, dtype, "cpu", seed=n + 1)
        params = make_params(op, x, channel_dim=1 if op == "acon_c" else 0)
        y, dx = _values_and_dx(op, x, params, g)
        ye, dxe = _values_and_dx(op, at_a_page_end(x), params, at_a_page_end(g))
        assert same_bits(ye, y) and same_bits(dxe, dx), n


def test_cpu_stores_setting():
    before = fusedact._C.cpu_stores()
    assert before == "auto"
    try:
        for name in ("streaming", "cached", "auto"):
            fusedact._C.set_cpu_stores(name)
            assert fusedact._C.cpu_stores() == name
        with pytest.raises(RuntimeError, match="'auto', 'streaming' or 'cached'"):
            fusedact._C.set_cpu_stores("nt")
    finally:
        fusedact._C.set_cpu_stores(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the rule asks mincore, Linux's")
def test_auto_stores_ask_whether_pages_are_in():
    """The auto rule streams only into pages already in memory: a fresh anonymous
    mapping (what glibc gives an allocation of 32 MiB or more) has none until written."""
    m = mmap.mmap(-1, 8 << 20)
    t = torch.frombuffer(m, dtype=torch.float32)
    assert not fusedact._C.cpu_pages_in(t.data_ptr(), t.nbytes)
    t[: t.numel() // 2 + 1].fill_(1.0)  # the first half and the middle page
    assert not fusedact._C.cpu_pages_in(t.data_ptr(), t.nbytes)  # the last page is still out
    t.fill_(1.0)
    assert fusedact._C.cpu_pages_in(t.data_ptr(), t.nbytes)
    del t
    m.close()


@pytest.mark.parametrize("op", OPS)
def test_large_tensors_auto_stores(op):
    """Outputs of 24 MiB and more under the auto rule: (32, 64, 56, 56) float32 (24.5 MiB,
    streaming once glibc reuses the memory) and 32 MiB (streaming where the pages are
    in, as under a caching allocator; glibc maps them anew, and the stores are cached)."""
    for n in (6_422_529, 8_400_001):
        shape = (n,) if op != "acon_c" else (2, 3, 1000, n // 6000)
        x = rand_x(shape, torch.float32, "cpu")
        channel_dim = 0 if len(shape) == 1 else 1
        check_forward_backward(op, x, make_params(op, x, channel_dim=channel_dim), channel_dim=channel_dim)


@pytest.mark.parametrize("shape", [(3, 11, 7, 7), (2, 9, 14, 14), (2, 5, 28, 28), (1, 3, 5, 5)], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["per-channel", "per-sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_acon_c_short_maps(device, dtype, per_sample, shape, backend):
    """NCHW maps of 7x7 to 28x28, where several (n, c) runs share a CUDA block (a group of
    one or two warps each) or a Triton program (16 runs of a 7x7 map), with a last block
    or program only partly full: every run's output and its parameters' gradients."""
    x = rand_x(shape, dtype, device)
    params = make_params(
        "acon_c", x, per_sample=per_sample, param_dtype=torch.float32 if dtype == torch.bfloat16 else dtype
    )
    check_forward_backward("acon_c", x, params, backend=backend)
