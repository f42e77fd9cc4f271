"""Everyday corners: activation checkpointing, meta tensors and modules, inference mode,
a stride-0 incoming gradient, deterministic algorithms, deepcopy / pickle / state_dict."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fusedact
from conftest import FUSED_BACKENDS, TOL
from helpers import every_module_cnn, make_params, op_fn, rand_x

OPS = ["swish", "mish", "hard_swish", "acon_c"]


def model(backend):
    return nn.Sequential(every_module_cnn(backend), nn.Conv2d(8, 2, 3))


def grads_of(m, x, run=None):
    x = x.clone().requires_grad_()
    y = (run or m)(x)
    y.square().sum().backward()
    out = [y.detach(), x.grad] + [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    return out


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_checkpoint_non_reentrant(backend):
    """torch.utils.checkpoint recomputes the fused forward in the backward: the same
    output and gradients, bit for bit (the same kernels on the same inputs)."""
    torch.manual_seed(0)
    m = model(backend)
    x = rand_x((2, 3, 6, 6), torch.float32, "cpu", scale=1.0)
    plain = grads_of(m, x)
    ckpt = grads_of(m, x, lambda t: checkpoint(m, t, use_reentrant=False))
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_meta_tensors(op, backend):
    """Meta tensors: shapes, dtypes and memory format of the forward and backward
    without running a kernel."""
    x = torch.empty((2, 4, 3, 5), device="meta").to(memory_format=torch.channels_last).requires_grad_()
    params = [
        p.to("meta").requires_grad_() if isinstance(p, torch.Tensor) else p
        for p in make_params(op, torch.empty(2, 4, 3, 5), per_sample=(op == "acon_c"))
    ]
    y = op_fn(op, backend)(x, *params)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(y.sum(), [x] + [p for p in params if isinstance(p, torch.Tensor)])
    for g, t in zip(grads, [x] + params):
        assert g.device.type == "meta" and g.shape == t.shape


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_modules_built_on_meta_device(backend):
    """A model built under torch.device("meta") runs on meta inputs, and once
    materialized (to_empty + load_state_dict) computes what the CPU model does."""
    torch.manual_seed(0)
    ref = model(backend)
    with torch.device("meta"):
        m = model(backend)
    assert all(p.device.type == "meta" for p in m.parameters())
    y = m(torch.empty(2, 3, 6, 6, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 2, 4, 4)
    m = m.to_empty(device="cpu")
    m.load_state_dict(ref.state_dict())
    x = rand_x((2, 3, 6, 6), torch.float32, "cpu", scale=1.0)
    assert torch.equal(m(x), ref(x))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_inference_mode(backend):
    torch.manual_seed(0)
    m = model(backend)
    x = rand_x((2, 3, 6, 6), torch.float32, "cpu", scale=1.0)
    with torch.no_grad():
        expected = m(x)
    with torch.inference_mode():
        y = m(x)
    assert y.is_inference() and not y.requires_grad
    assert torch.equal(y, expected)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_stride_zero_grad(op, backend):
    """y.sum().backward() feeds the backward an expanded (stride-0) gradient of ones:
    the gradients equal those of a dense gradient of ones."""
    x = rand_x((2, 4, 3, 5), torch.float32, "cpu")
    params = make_params(op, x, per_sample=(op == "acon_c"))
    results = []
    for dense in (False, True):
        leaves = [x.clone().requires_grad_()] + [
            p.clone().requires_grad_() for p in params if isinstance(p, torch.Tensor)
        ]
        y = op_fn(op, backend)(*leaves)
        if dense:
            y.backward(torch.ones(y.shape))
        else:
            y.sum().backward()
        results.append([t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_deterministic_algorithms(backend):
    """Under torch.use_deterministic_algorithms(True) nothing raises and two runs are
    bitwise equal (the kernels use no atomics)."""
    torch.manual_seed(0)
    m = model(backend)
    x = rand_x((2, 3, 6, 6), torch.float32, "cpu", scale=1.0)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [grads_of(m, x) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_deepcopy_pickle_state_dict(backend):
    """deepcopy, pickle (whole module) and state_dict round trips give the same model:
    the same outputs and gradients, bit for bit."""
    torch.manual_seed(0)
    m = model(backend)
    x = rand_x((2, 3, 6, 6), torch.float32, "cpu", scale=1.0)
    expected = grads_of(m, x)
    fresh = model(backend)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), fresh):
        for a, b in zip(expected, grads_of(other, x)):
            assert torch.equal(a, b)


def test_swish_loads_a_zero_dim_beta():
    """Swish's learnable beta is (1,) (FSDP2 shards no 0-dim parameter); a state dict
    with the earlier 0-dim beta loads into it."""
    sw = fusedact.nn.Swish(1.0, learnable=True)
    assert sw.beta.shape == (1,)
    sw.load_state_dict({"beta": torch.tensor(1.7)})
    assert sw.beta.shape == (1,) and sw.beta.item() == pytest.approx(1.7)
