"""fusedact.convert: real timm models and the ACON code's modules, converted in place,
compute the same outputs and gradients (to float32 rounding) with the same parameters.
The numbers are checked with fusedact.testing.assert_parity, the users' own check: the
fused kernels and ATen's round differently (a few ulp), so "the same" means at most
twice the eager model's error against a float64 copy, plus 4 float32 ulp."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fusedact
from conftest import FUSED_BACKENDS
from fusedact.testing import assert_parity


def count(model, types):
    return sum(isinstance(m, types) for m in model.modules())


TIMM_MODELS = [
    # (name, kwargs, the activation it uses, what replaces it)
    ("mobilenetv3_small_050", {}, nn.Hardswish, fusedact.nn.HardSwish),
    ("efficientnet_b0", {}, nn.SiLU, fusedact.nn.Swish),
    ("resnet10t", {"act_layer": "mish"}, nn.Mish, fusedact.nn.Mish),
]


@pytest.mark.parametrize("name,kwargs,act,fused", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_convert_timm_model(name, kwargs, act, fused):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    n_act = count(model, act)
    assert n_act > 0
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    report = assert_parity(model, torch.randn(4, 3, 64, 64))
    assert len(report) == 2 + len(params_before)  # output, dx, every parameter

    assert fusedact.convert(model) is model
    assert count(model, act) == 0 and count(model, fused) == n_act
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    assert list(model.state_dict()) == keys_before


# ---- the ACON code's modules, written from the paper's formula in the forms its
# implementations take (the official nmaac/acon code, YOLOv5's utils/activations.py)


class AconC(nn.Module):  # YOLOv5 / nmaac
    def __init__(self, c1):
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, c1, 1, 1) + 0.3 * torch.randn(1, c1, 1, 1))

    def forward(self, x):
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(self.beta * dpx) + self.p2 * x


class AconCSeq(nn.Module):  # a sequence variant: parameters (1, 1, C) for x of shape (N, L, C)
    def __init__(self, width):
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, 1, width))
        self.p2 = nn.Parameter(torch.randn(1, 1, width))
        self.beta = nn.Parameter(torch.ones(1, 1, width))

    def forward(self, x):
        return (self.p1 * x - self.p2 * x) * torch.sigmoid(self.beta * (self.p1 * x - self.p2 * x)) + self.p2 * x


class MetaAconC(nn.Module):  # YOLOv5: no BatchNorm
    def __init__(self, c1, k=1, s=1, r=16):
        super().__init__()
        c2 = max(r, c1 // r)
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.fc1 = nn.Conv2d(c1, c2, k, s, bias=True)
        self.fc2 = nn.Conv2d(c2, c1, k, s, bias=True)

    def forward(self, x):
        y = x.mean(dim=2, keepdims=True).mean(dim=3, keepdims=True)
        beta = torch.sigmoid(self.fc2(self.fc1(y)))
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(beta * dpx) + self.p2 * x


class MetaAconCBN(nn.Module):  # the paper's code: BatchNorm after each 1x1 convolution
    def __init__(self, width, r=16):
        super().__init__()
        self.fc1 = nn.Conv2d(width, max(r, width // r), kernel_size=1, stride=1, bias=True)
        self.bn1 = nn.BatchNorm2d(max(r, width // r))
        self.fc2 = nn.Conv2d(max(r, width // r), width, kernel_size=1, stride=1, bias=True)
        self.bn2 = nn.BatchNorm2d(width)
        self.p1 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, width, 1, 1))

    def forward(self, x):
        beta = torch.sigmoid(
            self.bn2(self.fc2(self.bn1(self.fc1(x.mean(dim=2, keepdims=True).mean(dim=3, keepdims=True)))))
        )
        return (self.p1 * x - self.p2 * x) * torch.sigmoid(beta * (self.p1 * x - self.p2 * x)) + self.p2 * x


class MetaAconCSigmoid(nn.Module):  # an early form of the paper's code: no bias, an nn.Sigmoid child
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Conv2d(width, width // 16, kernel_size=1, stride=1, bias=False)
        self.fc2 = nn.Conv2d(width // 16, width, kernel_size=1, stride=1, bias=False)
        self.p1 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        beta = self.sigmoid(self.fc2(self.fc1(x.mean(dim=2, keepdims=True).mean(dim=3, keepdims=True))))
        return (self.p1 * x - self.p2 * x) * self.sigmoid(beta * (self.p1 * x - self.p2 * x)) + self.p2 * x


class MetaAconC1d(nn.Module):  # for (N, C, L): Conv1d and BatchNorm1d
    def __init__(self, width, r=16):
        super().__init__()
        self.fc1 = nn.Conv1d(width, max(r, width // r), kernel_size=1, bias=True)
        self.bn1 = nn.BatchNorm1d(max(r, width // r))
        self.fc2 = nn.Conv1d(max(r, width // r), width, kernel_size=1, bias=True)
        self.bn2 = nn.BatchNorm1d(width)
        self.p1 = nn.Parameter(torch.randn(1, width, 1))
        self.p2 = nn.Parameter(torch.randn(1, width, 1))

    def forward(self, x):
        beta = torch.sigmoid(self.bn2(self.fc2(self.bn1(self.fc1(x.mean(dim=2, keepdims=True))))))
        return (self.p1 * x - self.p2 * x) * torch.sigmoid(beta * (self.p1 * x - self.p2 * x)) + self.p2 * x


class AconNet(nn.Module):
    def __init__(self):
        super().__init__()
        c = 32
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.acts2d = nn.Sequential(
            AconC(c),
            nn.Conv2d(c, c, 3, padding=1),
            MetaAconC(c),
            nn.Conv2d(c, c, 3, padding=1),
            MetaAconCBN(c),
            nn.Conv2d(c, c, 3, padding=1),
            MetaAconCSigmoid(c),
        )
        self.seq = AconCSeq(c)
        self.meta1d = MetaAconC1d(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        h = self.acts2d(self.stem(x))
        h = self.seq(h.flatten(2).transpose(1, 2))  # (N, L, C)
        h = self.meta1d(h.transpose(1, 2))  # (N, C, L)
        return self.head(h.mean(2))


ACON_TYPES = (AconC, AconCSeq, MetaAconC, MetaAconCBN, MetaAconCSigmoid, MetaAconC1d)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_convert_acon_modules(backend, training):
    torch.manual_seed(0)
    model = AconNet().train(training)
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_parity(model, torch.randn(4, 3, 8, 8), backend=backend)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every ACON form is recognised: no "left as it is"
        fusedact.convert(model, backend=backend)
    assert count(model, ACON_TYPES) == 0
    assert count(model, fusedact.nn.AconC) == 2 and count(model, fusedact.nn.MetaAconC) == 4
    # Meta-ACON's own BatchNorms (over (N, C, 1, 1)) stay nn.BatchNorm2d: convert's
    # BatchNorm rule does not reach into fusedact's modules
    assert type(model.acts2d[4].bn1) is nn.BatchNorm2d and type(model.acts2d[4].bn2) is nn.BatchNorm2d
    assert model.seq.channel_dim == -1
    assert all(
        m.backend == backend for m in model.modules() if isinstance(m, (fusedact.nn.AconC, fusedact.nn.MetaAconC))
    )
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    assert list(model.state_dict()) == keys_before
    assert all(m.training == training for m in model.modules())


def test_convert_keeps_optimizer_and_sharing():
    """An optimizer built before conversion trains the converted model; a module used
    twice is one module after."""
    torch.manual_seed(0)
    shared = nn.SiLU()
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared, AconCLinear(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fusedact.convert(model)
    assert model[1] is model[3] and isinstance(model[1], fusedact.nn.Swish)
    p1 = model[4].p1.detach().clone()
    model(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[4].p1, p1)


class AconCLinear(AconC):  # ACON-C on (N, C) features: parameters (1, C)
    def __init__(self, c):
        nn.Module.__init__(self)
        self.p1 = nn.Parameter(torch.randn(1, c))
        self.p2 = nn.Parameter(torch.randn(1, c))
        self.beta = nn.Parameter(torch.ones(1, c))


def test_convert_root_module_and_backend():
    new = fusedact.convert(nn.Hardswish(), backend="eager")
    assert isinstance(new, fusedact.nn.HardSwish) and new.backend == "eager"
    model = nn.Sequential(fusedact.nn.Mish(), nn.Mish())
    fusedact.convert(model, backend="eager")
    assert [m.backend for m in model] == ["eager", "eager"]
    with pytest.raises(ValueError, match="unknown backend"):
        fusedact.convert(model, backend="cuda")


class AconLike(nn.Module):  # named like ACON, with p1 but shaped otherwise: left alone, warned
    def __init__(self):
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.gamma = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        return x * self.p1 + self.gamma


class SiLUSubclass(nn.SiLU):  # a subclass may compute something else: left alone
    def forward(self, x):
        return super().forward(x) * 2


def test_convert_leaves_what_it_does_not_know():
    model = nn.Sequential(AconLike(), SiLUSubclass(), nn.GELU())
    with pytest.warns(UserWarning, match="left .*AconLike as it is"):
        fusedact.convert(model)
    assert [type(m) for m in model] == [AconLike, SiLUSubclass, nn.GELU]
