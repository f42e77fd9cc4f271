"""Inputs and checks shared by the test modules: how to call each op, its float64
reference result, and the comparison with the tolerance table."""

from __future__ import annotations

import contextlib

import torch

import fusedact

# The op-level checks live in fusedact/_numerics.py, shared with `python -m fusedact.selftest`.
from fusedact.testing import check_no_less_accurate  # noqa: F401
from fusedact._numerics import (  # noqa: F401
    check_close,
    check_forward_backward,
    make_params,
    op_fn,
    param_terms_abs,
    rand_x,
    ref_fn,
    to64,
)


def every_module_cnn(backend, c_in: int = 3, width: int = 8, r: int = 4):
    """Convolutions with every fusedact module between them (float32, CPU); callers add a head."""
    import fusedact
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(c_in, width, 3, padding=1),
        fusedact.nn.AconC(width, backend=backend),
        nn.Conv2d(width, width, 3, padding=1),
        fusedact.nn.MetaAconC(width, r=r, backend=backend),
        fusedact.nn.Swish(1.3, learnable=True, backend=backend),
        fusedact.nn.Mish(backend=backend),
        fusedact.nn.HardSwish(backend=backend),
    )


def outputs_and_grads(model, x, *, with_x=True, autocast_dtype=None):
    """[output, dx (when with_x), d every parameter] of a model for a fixed cotangent (a
    ramp from -1 to 1), the forward under torch.autocast when autocast_dtype is given."""
    x = x.detach().clone().requires_grad_(with_x)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        y = model(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64, device=y.device).reshape(y.shape).to(y.dtype)
    return [y] + list(torch.autograd.grad(y, ([x] if with_x else []) + list(model.parameters()), g))


@contextlib.contextmanager
def compile_mode(mode: str):
    """fusedact.config.compile = mode inside, restored after."""
    before = fusedact.config.compile
    fusedact.config.compile = mode
    try:
        yield
    finally:
        fusedact.config.compile = before


def same_bits(a, b):
    """a and b equal bit for bit, but for the sign and payload of a NaN (IEEE leaves them
    open)."""
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])


def at_a_page_end(t):
    """A copy of t that ends where a readable page ends and an unreadable one (PROT_NONE)
    begins: a kernel that reads a byte past its end faults. Linux. The mapping lives as
    long as the copy (torch.frombuffer holds it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    pages = -(-t.nbytes // page) + 1
    m = mmap.mmap(-1, pages * page)
    base = torch.frombuffer(m, dtype=torch.uint8, count=(pages - 1) * page)
    assert libc.mprotect(base.data_ptr() + (pages - 1) * page, page, 0) == 0, ctypes.get_errno()
    c = base[base.numel() - t.nbytes :].view(t.dtype).view(t.shape)
    return c.copy_(t)
