"""torch.fx.symbolic_trace: every op is one call_function node of the public function,
every module traces (MetaAconC's spatial mean a wrapped leaf), and the traced
GraphModule computes the module's outputs and gradients bit for bit. What users run it
through: torchvision's create_feature_extractor, FX quantization, timm's FX features."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

import fusedact
import fusedact.functional as F
from conftest import FUSED_BACKENDS
from helpers import every_module_cnn

BACKENDS = FUSED_BACKENDS + ["eager"]


class Functional(nn.Module):
    """Each functional op once, with the backend as a keyword when one is chosen."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.p1 = nn.Parameter(torch.randn(4))
        self.p2 = nn.Parameter(torch.randn(4))
        self.beta = nn.Parameter(torch.rand(4) + 0.5)
        self.swish_beta = nn.Parameter(torch.tensor([1.3]))

    def forward(self, x):
        kw = {} if self.backend is None else {"backend": self.backend}
        y = F.swish(x, **kw) + F.swish(x, 0.7, **kw) + F.swish(x, self.swish_beta, **kw)
        y = y + F.mish(x, **kw) + F.hard_swish(x, **kw)
        return y + F.acon_c(x, self.p1, self.p2, self.beta, channel_dim=1, **kw)


def same_outputs_and_grads(gm, model, x):
    """gm and model give the same output and the same gradients of x and of every
    parameter, matched by name (a GraphModule holds its parameters in the order the
    trace met them), bit for bit."""
    results = []
    for m in (gm, model):
        xl = x.detach().clone().requires_grad_()
        y = m(xl)
        names, params = zip(*sorted(m.named_parameters()))
        g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        results.append((names, [y, *torch.autograd.grad(y, [xl, *params], g)]))
    (names_a, a), (names_b, b) = results
    assert names_a == names_b
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def fusedact_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in F.__dict__.values()]


@pytest.mark.parametrize("backend", [None] + BACKENDS)
def test_functional_ops_are_leaf_nodes(backend):
    torch.manual_seed(0)
    m = Functional(backend)
    gm = torch.fx.symbolic_trace(m)
    nodes = fusedact_nodes(gm)
    assert [n.target for n in nodes] == [F.swish, F.swish, F.swish, F.mish, F.hard_swish, F.acon_c]
    for n in nodes:
        assert n.kwargs.get("backend") == backend
    assert nodes[1].args[1] == 0.7 and nodes[-1].kwargs["channel_dim"] == 1
    x = torch.randn(2, 4, 5, 5)
    same_outputs_and_grads(gm, m, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn", [False, True])
def test_every_module_traces(backend, bn):
    torch.manual_seed(0)
    model = every_module_cnn(backend)
    if bn:
        model[3] = fusedact.nn.MetaAconC(8, r=4, bn=True, backend=backend)
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in fusedact_nodes(gm)]
    assert targets == [F.acon_c, F.acon_c, F.swish, F.mish, F.hard_swish]
    # MetaAconC's spatial mean, wrapped: its loop over x's rank is not traced
    assert any(n.op == "call_function" and n.target is fusedact.nn._spatial_mean for n in gm.graph.nodes)
    x = torch.randn(2, 3, 6, 6)
    same_outputs_and_grads(gm, model, x)


def test_meta_acon_conv1d_traces():
    """(N, C, L) with Conv1d 1x1 convolutions, as a converted module may have them."""
    torch.manual_seed(0)
    m = fusedact.nn.MetaAconC(6, r=2)
    m.fc1 = nn.Conv1d(6, m.fc1.out_channels, 1)
    m.fc2 = nn.Conv1d(m.fc2.in_channels, 6, 1)
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(3, 6, 7)
    assert torch.equal(gm(x), m(x))


def test_converted_model_traces():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.Hardswish(), nn.Mish())
    fusedact.convert(model)
    gm = torch.fx.symbolic_trace(model)
    assert [n.target for n in fusedact_nodes(gm)] == [F.swish, F.hard_swish, F.mish]
    x = torch.randn(2, 3, 9, 9)
    same_outputs_and_grads(gm, model, x)


def test_converted_batch_norms_are_leaf_modules():
    """A converted BatchNorm (a pair, one before a ReLU, one alone with momentum=None)
    traces as a call_module node of its path, as nn.BatchNorm2d does: the GraphModule
    computes the same outputs and gradients and updates the running statistics as the
    model does (the cumulative average too)."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, momentum=None),
    )  # fmt: skip
    fusedact.convert(model)
    ref = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    bns = [t for t in calls if "BatchNorm" in type(modules[t]).__name__]
    assert bns == ["1", "4", "7"] and all(isinstance(modules[t], fusedact.nn.BatchNormAct2d) for t in bns)
    x = torch.randn(2, 3, 9, 9)
    for _ in range(2):
        gm(x), ref(x)
    for t in bns:
        assert torch.equal(modules[t].running_var, ref.get_submodule(t).running_var)
        assert modules[t].num_batches_tracked == 2
    same_outputs_and_grads(gm, model, x)
    gm.eval(), model.eval()
    same_outputs_and_grads(gm, model, x)


def test_fx_quantization_of_a_converted_model():
    """FX graph mode quantization (prepare_fx, calibration, convert_fx) runs on a converted
    model: its convs become int8, each BatchNormAct2d stays a float leaf (it cannot be
    folded into the conv as nn.BatchNorm2d is), and the outputs are as close to the float
    model's as the quantized original's (within an int8 step of the output's range)."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Hardswish()
    ).eval()
    converted = fusedact.convert(copy.deepcopy(model)).eval()
    x = torch.randn(2, 3, 12, 12)
    errors = []
    for m in (model, converted):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FX quantization's deprecation
            prepared = prepare_fx(copy.deepcopy(m), get_default_qconfig_mapping("x86"), (x,))
            prepared(x)
            quantized = convert_fx(prepared)
        errors.append((quantized(x) - model(x)).abs().max().item())
    kinds = [type(m) for m in quantized.children()]
    assert kinds.count(fusedact.nn.BatchNormAct2d) == 2 and kinds.count(torch.ao.nn.quantized.Conv2d) == 2
    step = (model(x).max() - model(x).min()).item() / 255
    assert errors[1] <= errors[0] + step, errors


def test_untraced_calls_unchanged():
    """Outside a trace nothing is a Proxy: the ops still check their arguments."""
    with pytest.raises(TypeError, match="x must be a tensor"):
        F.hard_swish([1.0])
    with pytest.raises(TypeError, match="x must be a tensor"):
        F.acon_c([1.0], torch.ones(1), torch.ones(1), torch.ones(1))


def test_torchvision_feature_extractor():
    """create_feature_extractor (symbolic_trace underneath) on a converted MobileNetV3."""
    models = pytest.importorskip("torchvision.models")
    fx_utils = pytest.importorskip("torchvision.models.feature_extraction")
    torch.manual_seed(0)
    model = models.mobilenet_v3_small(num_classes=10).eval()
    fusedact.convert(model)
    assert any(isinstance(m, fusedact.nn.HardSwish) for m in model.modules())
    extractor = fx_utils.create_feature_extractor(model, return_nodes={"features.3": "mid", "classifier": "out"})
    assert sum(n.target is F.hard_swish for n in extractor.graph.nodes) > 0
    x = torch.randn(2, 3, 64, 64)
    feats = extractor(x)
    assert torch.equal(feats["out"], model(x))
    assert torch.equal(feats["mid"], model.features[:4](x))
