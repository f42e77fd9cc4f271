"""fusedact.testing.assert_parity: passes on converted models in every dtype, mode and
output structure, and fails, naming the tensors, when a fused module is sabotaged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusedact
from conftest import DEVICES, FUSED_BACKENDS
from fusedact.testing import ParityReport, assert_parity, check_no_less_accurate

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def cnn(c=8):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.SiLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.Mish(),
        nn.Conv2d(c, c, 3, padding=1),
        fusedact.nn.AconC(c),
        nn.Hardswish(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * c, 5),
    )


class Heads(nn.Module):
    """Outputs in a dict, a tuple and a list; an integer output that is not compared."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 8), nn.Hardswish())
        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x, scale):
        h = self.body(x) * scale
        return {"logits": self.a(h), "aux": (self.b(h), [h.sum(1)]), "index": h.argmax(1)}


def names(report: ParityReport) -> list[str]:
    return [r.name for r in report]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_cnn_with_batchnorm(device, dtype, training):
    model = cnn().to(device).train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = assert_parity(model, torch.randn(4, 3, 8, 8, device=device), dtype=dtype)
    assert report.ok and isinstance(report, ParityReport)
    # output, the input's gradient, and every parameter's
    assert names(report) == ["output", "input[0].grad"] + [f"{n}.grad" for n, _ in model.named_parameters()]
    assert all(r.dtype == str(dtype).replace("torch.", "") for r in report)
    # the model itself is untouched: not converted, not cast, BatchNorm statistics unchanged
    assert not any(isinstance(m, fusedact.nn.Swish) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a bias before training-mode BatchNorm has an exact gradient of zero: rounding noise
    # in any dtype, reported but not judged
    assert [r.name for r in report if not r.judged] == (["0.bias.grad"] if training else [])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_structured_outputs_and_extra_inputs(backend):
    torch.manual_seed(0)
    report = assert_parity(Heads(), torch.randn(5, 6), torch.tensor(1.5), backend=backend)
    assert names(report)[:4] == ["output['logits']", "output['aux'][0]", "output['aux'][1][0]", "input[0].grad"]
    assert "input[1].grad" in names(report)  # the scalar input's gradient, too


def test_loss_fn():
    seen = []

    def loss_fn(out):
        seen.append(out["logits"].dtype)
        return nn.functional.cross_entropy(out["logits"], torch.arange(5) % 3)

    torch.manual_seed(0)
    assert_parity(Heads(), torch.randn(5, 6), torch.tensor(1.0), loss_fn=loss_fn)
    assert seen == [torch.float32, torch.float64, torch.float32]  # fused, truth, eager


def test_model_without_a_convertible_module_is_an_error():
    with pytest.raises(AssertionError, match="nothing to compare"):
        assert_parity(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(2, 3))
    report = assert_parity(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(2, 3), require_conversion=False)
    assert report.ok


# ---- the checker fails where it must: a fused module sabotaged through its hooks
# (public API only), by 16 ulp of the dtype, forward or backward


def sabotaged_convert(monkeypatch, where: str, factor: float):
    real = fusedact.convert

    def convert(model, **kw):
        model = real(model, **kw)
        for m in model.modules():
            if isinstance(m, fusedact.nn.Mish):
                if where == "forward":
                    m.register_forward_hook(lambda mod, args, out: out * factor)
                else:
                    m.register_full_backward_hook(lambda mod, gin, gout: (gin[0] * factor,))
        return model

    monkeypatch.setattr(fusedact, "convert", convert)


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sabotage_is_caught(monkeypatch, dtype, where):
    model, x = cnn().eval(), torch.randn(4, 3, 8, 8)
    assert_parity(model, x, dtype=dtype)  # honest first
    sabotaged_convert(monkeypatch, where, 1 + 16 * torch.finfo(dtype).eps)
    with pytest.raises(AssertionError, match=r"tensors are less accurate than allowed") as e:
        assert_parity(model, x, dtype=dtype)
    message = str(e.value)
    # the worst tensors are named with their errors and bounds
    assert "rel err" in message and "bound" in message and " NO" in message
    failed = {r.name for r in e.value.report if not r.ok}
    # either way the scaled gradient flows back through the Mish to what lies before it
    assert "0.weight.grad" in failed and "input[0].grad" in failed
    if where == "backward":  # and to nothing after it
        assert "output" not in failed and "10.weight.grad" not in failed


def test_check_no_less_accurate():
    truth = torch.linspace(1, 2, 100, dtype=torch.float64)
    eager = (truth * (1 + 1e-7)).float()
    good = (truth * (1 - 1e-7)).float()
    bad = (truth * (1 + 1e-5)).float()
    assert check_no_less_accurate([("t", good, eager, truth)], slack=0).ok
    with pytest.raises(AssertionError, match=r"(?s)1 of 1 tensors.*\bt\b.*NO"):
        check_no_less_accurate([("t", bad, eager, truth)], slack=0)
    with pytest.raises(AssertionError):  # a NaN fails, whatever the bound
        check_no_less_accurate([("t", good.clone().fill_(float("nan")), eager, truth)], slack=1.0)
