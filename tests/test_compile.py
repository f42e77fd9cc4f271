"""torch.compile with the default inductor backend: whole models of fusedact modules
traced into one graph (fullgraph=True, no graph break), forward and backward, with
dynamic shapes and no recompilation when the batch or the image size changes."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import fusedact
from conftest import DEVICES, FUSED_BACKENDS, make_layout
from helpers import compile_mode


def compile_mode_for(mode, backend, device):
    """fusedact.config.compile = mode for the test; the Triton ops on the CPU compile with
    aot_eager, which does not read it: those cases run once."""
    if mode != "kernel" and compiler_for(backend, device) != "inductor":
        pytest.skip("aot_eager never decomposes: the mode changes nothing")
    return compile_mode(mode)


# Both ways Inductor can treat the ops (fusedact.config.compile): fused into its own
# kernels, or kept as our kernels
COMPILE_MODES = ["fuse", "kernel"]


def compiler_for(backend: str, device: str) -> str:
    # Under TRITON_INTERPRET=1 the Triton ops are opaque custom ops whose kernels run in
    # the interpreter on the CPU; inductor would compile the rest of the graph only.
    # aot_eager traces the same joint graph (what matters for breaks and recompiles)
    # without compiling C++ for it.
    return "aot_eager" if (backend == "triton" and device == "cpu") else "inductor"


def make_model(backend, device, channels=8):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        fusedact.nn.AconC(channels, backend=backend),
        nn.Conv2d(channels, channels, 3, padding=1),
        fusedact.nn.MetaAconC(channels, r=4, backend=backend),
        fusedact.nn.Swish(1.0, learnable=True, backend=backend),
        fusedact.nn.Mish(backend=backend),
        fusedact.nn.HardSwish(backend=backend),
    ).to(device)


def grads_of(model, x, dynamic_batch=False):
    """Output, and the gradients of x and every parameter, for a fixed cotangent."""
    x = x.detach().requires_grad_()
    if dynamic_batch:  # on the tensor the model sees (detach() drops the mark)
        torch._dynamo.mark_dynamic(x, 0)
    y = model(x)
    g = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).reshape(y.shape)
    return y, torch.autograd.grad(y, [x] + list(model.parameters()), g)


class no_recompile:
    """Inside it, any recompilation raises torch._dynamo.exc.RecompileError."""

    def __enter__(self):
        self._patch = torch._dynamo.config.patch(error_on_recompile=True)
        self._patch.__enter__()

    def __exit__(self, *exc):
        self._patch.__exit__(*exc)


# Batch sizes from 2 up: PyTorch specializes sizes 0 and 1 in any compiled graph, so
# batch size 1 always compiles on its own. 8 equals the channel count, which would show
# a guard that confuses N with C.
BATCHES = [2, 3, 5, 8]


@pytest.mark.parametrize("mode", COMPILE_MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_dynamic_batch_compiles_once(backend, device, layout, mode):
    """A CNN with every fusedact module, dynamic=True: one graph serves every batch size,
    forward and backward, and matches the uncompiled model."""
    with compile_mode_for(mode, backend, device):
        dynamic_batch_compiles_once(backend, device, layout)


# The compiled results are compared with eager in float64 (the model and its inputs):
# compiled and eager reduce in other orders and Inductor rounds its decompositions its
# own way, which in float32 through a chain of ops exceeds an elementwise tolerance
# (test_inductor.py holds each op's float32 result to the bound of a float32 sum);
# in float64 the same function agrees to torch's default 1e-7.
F64 = torch.float64


def dynamic_batch_compiles_once(backend, device, layout):
    torch._dynamo.reset()
    model = make_model(backend, device).to(F64)
    compiled = torch.compile(model, backend=compiler_for(backend, device), fullgraph=True, dynamic=True)
    for i, n in enumerate(BATCHES):
        x = make_layout(torch.randn(n, 3, 6, 7, device=device, dtype=F64), layout)
        with no_recompile() if i else contextlib.nullcontext():
            y_c, g_c = grads_of(compiled, x)
        y, g = grads_of(model, x)
        torch.testing.assert_close(y_c, y)
        for a, b in zip(g_c, g):
            torch.testing.assert_close(a, b)


class FusedOnly(nn.Module):
    """Every op with nothing else around it: Swish (float and learnable beta), Mish,
    HardSwish, AconC, and Meta-ACON's per-sample beta as an input, NCHW and (N, L, C)."""

    def __init__(self, backend, channels=4):
        super().__init__()
        self.backend = backend
        self.swish = fusedact.nn.Swish(1.0, learnable=True, backend=backend)
        self.acon = fusedact.nn.AconC(channels, backend=backend)
        self.acon_nlc = fusedact.nn.AconC(channels, channel_dim=-1, backend=backend)

    def forward(self, x, beta_per_sample):
        b = self.backend
        h = self.swish(x) + fusedact.swish(x, 0.7, backend=b)
        h = fusedact.mish(h, backend=b) * fusedact.hard_swish(x, backend=b)
        h = self.acon(h)
        h = fusedact.acon_c(h, self.acon.p1.reshape(-1), self.acon.p2.reshape(-1), beta_per_sample, backend=b)
        nlc = self.acon_nlc(h.flatten(2).transpose(1, 2))  # (N, L, C), channels last
        return h + nlc.transpose(1, 2).reshape(h.shape)


@pytest.mark.parametrize("mode", COMPILE_MODES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_dynamic_any_shape_compiles_once(backend, device, mode):
    """The fused ops add no guard on any size: batch, height and width all change, with
    no recompilation."""
    with compile_mode_for(mode, backend, device):
        dynamic_any_shape_compiles_once(backend, device)


def dynamic_any_shape_compiles_once(backend, device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = FusedOnly(backend).to(device, F64)
    compiled = torch.compile(model, backend=compiler_for(backend, device), fullgraph=True, dynamic=True)
    for i, (n, h, w) in enumerate([(2, 6, 7), (3, 9, 4), (5, 5, 5), (8, 2, 11)]):
        x = torch.randn(n, 4, h, w, device=device, dtype=F64, requires_grad=True)
        beta = torch.rand(n, 4, device=device, dtype=F64, requires_grad=True)
        with no_recompile() if i else contextlib.nullcontext():
            y_c = compiled(x, beta)
            g_c = torch.autograd.grad(y_c.sum(), [x, beta] + list(model.parameters()))
        y = model(x, beta)
        g = torch.autograd.grad(y.sum(), [x, beta] + list(model.parameters()))
        torch.testing.assert_close(y_c, y)
        for a, b in zip(g_c, g):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_default_compile_recompiles_at_most_once(device):
    """The default (automatic dynamic): the first batch size compiles static, the first
    change recompiles with a dynamic batch, and no later batch size compiles again."""
    torch._dynamo.reset()
    model = make_model("native", device)
    compiled = torch.compile(model, fullgraph=True)
    grads_of(compiled, torch.randn(BATCHES[0], 3, 6, 7, device=device))
    with pytest.raises(torch._dynamo.exc.RecompileError), no_recompile():
        grads_of(compiled, torch.randn(BATCHES[1], 3, 6, 7, device=device))  # the test can fail
    grads_of(compiled, torch.randn(BATCHES[1], 3, 6, 7, device=device))
    with no_recompile():
        for n in BATCHES[2:]:
            grads_of(compiled, torch.randn(n, 3, 6, 7, device=device))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_mark_dynamic_batch_compiles_once(backend):
    """torch._dynamo.mark_dynamic on the batch dimension: one compile for every batch."""
    torch._dynamo.reset()
    model = make_model(backend, "cpu")
    compiled = torch.compile(model, backend=compiler_for(backend, "cpu"), fullgraph=True)
    for i, n in enumerate(BATCHES):
        with no_recompile() if i else contextlib.nullcontext():
            grads_of(compiled, torch.randn(n, 3, 6, 6), dynamic_batch=True)


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "eager"])
def test_explain_finds_no_graph_break(backend):
    """torch._dynamo.explain over the functional API and the modules: one graph, no break
    (the eager backend too: its argument checks are guards, not breaks)."""
    torch._dynamo.reset()
    model = FusedOnly(backend)
    x, beta = torch.randn(2, 4, 6, 6), torch.rand(2, 4)
    explanation = torch._dynamo.explain(model)(x, beta)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    targets = [str(node.target) for g in explanation.graphs for node in g.graph.nodes if node.op == "call_function"]
    fused_calls = sum(t == "autograd_function_apply" or "fusedact" in t for t in targets)
    assert fused_calls == (0 if backend == "eager" else 7), targets
