"""torch.export of a model with every fusedact module: the fused ops stay in the graph
(static and with a dynamic batch), the ExportedProgram round-trips through
torch.export.save/load in a fresh process that imports fusedact, and the AOTInductor
package of it runs there too (CPU) and gives the eager model's outputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedact
from conftest import FUSED_BACKENDS, TOL
from helpers import every_module_cnn, rand_x

FUSED_OPS = ("acon_c_forward", "swish_forward", "mish_forward", "hard_swish_forward")
ROOT = Path(fusedact.__file__).resolve().parent.parent


def fused_targets(ep, namespace="fusedact"):
    return {
        n.target.name().split("::")[1].split(".")[0]
        for n in ep.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == namespace
    }


def model_and_inputs(backend="native"):
    torch.manual_seed(0)
    model = every_module_cnn(backend).eval()
    return (
        model,
        rand_x((2, 3, 6, 6), torch.float32, "cpu", scale=1.0),
        rand_x((5, 3, 6, 6), torch.float32, "cpu", seed=5, scale=1.0),
    )


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_export_keeps_the_fused_ops(backend, dynamic):
    model, x, x5 = model_and_inputs(backend)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    ep = torch.export.export(model, (x,), dynamic_shapes=shapes)
    namespace = "fusedact" if backend == "native" else "fusedact_triton"
    assert fused_targets(ep, namespace) == set(FUSED_OPS)
    with torch.no_grad():
        for xb in (x, x5) if dynamic else (x,):
            assert torch.equal(ep.module()(xb), model(xb))  # the same kernels on the same inputs


def run_fresh(tmp_path: Path, code: str, env_extra: dict | None = None) -> None:
    """Runs code in a new Python process that imports fusedact (and nothing of this one)."""
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # This process's thread count: the convolutions' results depend on it, and importing
    # ultralytics (tests/test_ultralytics.py, earlier in the same worker) sets
    # OMP_NUM_THREADS=1 in os.environ, which a new process would inherit.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    script = tmp_path / "fresh.py"
    script.write_text("import torch\nimport fusedact\n" + code)
    subprocess.run([sys.executable, str(script)], check=True, env=env, cwd=tmp_path, timeout=900)


def test_save_load_in_a_fresh_process(tmp_path):
    model, x, x5 = model_and_inputs()
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    torch.export.save(ep, tmp_path / "model.pt2")
    torch.save(x5, tmp_path / "x.pt")
    run_fresh(
        tmp_path,
        (
            "ep = torch.export.load('model.pt2')\n"
            "assert {str(n.target) for n in ep.graph.nodes} >= {'fusedact.acon_c_forward.default', 'fusedact.mish_forward.default'}\n"  # noqa: E501
            "with torch.no_grad():\n"
            "    torch.save(ep.module()(torch.load('x.pt')), 'y.pt')\n"
        ),
    )
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), model(x5))


def _traceable_model():
    """every_module_cnn with two BatchNormAct2d (SiLU, hard-Swish) after it, their
    running statistics moved off their initial values."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        every_module_cnn("native"),
        fusedact.nn.BatchNormAct2d(8, act="swish"),
        nn.Conv2d(8, 8, 1),
        fusedact.nn.BatchNormAct2d(8, act="hard_swish"),
    )
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 6, 6))
    return model


def test_torchscript_trace_keeps_the_ops_and_loads_in_a_fresh_process(tmp_path):
    """torch.jit.trace (ultralytics' TorchScript export): an inference trace (under
    no_grad, the parameters frozen as ultralytics' export leaves them) holds the fused
    ops, the BatchNorm's as its C++ passes, saves with torch.jit.save and runs in a new
    process that imports fusedact (which registers the ops) with the eager model's
    outputs bit for bit, at another batch size too."""
    model = _traceable_model().eval().requires_grad_(False)
    x, x5 = torch.randn(2, 3, 6, 6), torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    ops = set(re.findall(r"fusedact::(\w+)", str(traced.inlined_graph)))
    assert ops >= {"acon_c_forward", "swish_forward", "mish_forward", "hard_swish_forward", "bn_act_apply"}, ops
    torch.jit.save(traced, str(tmp_path / "model.ts"))
    torch.save(x5, tmp_path / "x.pt")
    run_fresh(
        tmp_path,
        ("m = torch.jit.load('model.ts')\nwith torch.no_grad():\n    torch.save(m(torch.load('x.pt')), 'y.pt')\n"),
    )
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), model(x5))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torchscript_trace_with_grad_differentiates(training):
    """A trace made with grad enabled records the BatchNorm as fusedact's differentiable
    graph ops: its outputs, every parameter's gradient and the running statistics are
    the module's bit for bit. (Traced as the fast eager path's inner C++ passes, its
    backward lost every gradient before the BatchNorm.)"""
    model, copy = _traceable_model().train(training), _traceable_model().train(training)
    x = torch.randn(2, 3, 6, 6)
    traced = torch.jit.trace(copy, x, check_trace=False)  # tracing runs a step: the statistics move
    with torch.no_grad():
        model(x)
    assert "fusedact::batch_norm_act" in str(traced.inlined_graph)
    x4 = torch.randn(4, 3, 6, 6)
    got, want = traced(x4), model(x4)
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    params, ref_params = list(copy.parameters()), list(model.parameters())
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, ref_params, g)):
        assert torch.equal(a, b)
    for a, b in zip(copy.buffers(), model.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torchscript_trace_passes_its_check_and_trains(training, grad):
    """torch.jit.trace as most call it (check_trace on: it traces again under no_grad and
    compares the graphs) takes a model with trainable BatchNormAct2d, with grad on or
    under no_grad: the trace records the differentiable graph ops either way, so the
    check sees the same graph (a grad-mode choice failed it for every trace made with
    grad on), and the trace gives the module's outputs and gradients bit for bit."""
    model, copy = _traceable_model().train(training), _traceable_model().train(training)
    x = torch.randn(2, 3, 6, 6)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(copy, x)  # two traced steps in training: the statistics move twice
    assert "fusedact::batch_norm_act" in str(traced.inlined_graph)
    copy.load_state_dict(model.state_dict())  # the statistics back where the model's are
    x4 = torch.randn(4, 3, 6, 6)
    got, want = traced(x4), model(x4)
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    params, ref_params = list(copy.parameters()), list(model.parameters())
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, ref_params, g), strict=True):
        assert torch.equal(a, b)


def test_inductor_compiles_under_ci(tmp_path):
    """Inductor, in a fresh process with CI=1 (GitHub Actions sets CI), compiles a model
    with every fused op: with an entry in torch._decomp's global table and no lowering,
    Inductor raises "make_fallback(fusedact...): a decomposition exists" there (it did,
    when fusedact.onnx registered its ONNX decompositions globally)."""
    code = (
        "from helpers import every_module_cnn\n"
        "torch.manual_seed(0)\n"
        "model = every_module_cnn('native')\n"
        "compiled = torch.compile(model)\n"
        "x = torch.randn(2, 3, 6, 6, requires_grad=True)\n"
        "compiled(x).sum().backward()  # a training graph: forward and backward\n"
        "g = x.grad\n"
        "x.grad = None\n"
        "model(x).sum().backward()\n"
        "torch.testing.assert_close(g, x.grad)\n"
        "with torch.no_grad():  # an inference graph\n"
        "    torch.testing.assert_close(compiled(x), model(x))\n"
    )
    env_ci = {"CI": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    run_fresh(tmp_path, code, env_ci)


def test_aoti_compile_and_package_cpu(tmp_path):
    """AOTInductor compiles the model to a package whose fused ops are calls of our C++
    ops (through the dispatcher); a fresh process that imports fusedact runs it."""
    model, x, x5 = model_and_inputs()
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model_aoti.pt2"))
    torch.save(x5, tmp_path / "x.pt")
    run_fresh(
        tmp_path,
        (
            f"runner = torch._inductor.aoti_load_package({path!r})\n"
            "with torch.no_grad():\n"
            "    torch.save(runner(torch.load('x.pt')), 'y.pt')\n"
        ),
    )
    with torch.no_grad():
        # inductor compiles the convolutions and means itself: same math, other rounding
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x5), **TOL[torch.float32])
