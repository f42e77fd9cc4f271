"""A real client: an Ultralytics YOLOv8 detection model, built from its own yaml (no
weights downloaded), converted with fusedact.convert: the same forward outputs and
training-step gradients (its own detection loss) as the unconverted model in float64,
then exported to ONNX and run in onnxruntime."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fusedact
from conftest import TOL

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks or downloads
ultralytics = pytest.importorskip("ultralytics")  # .ci/run asserts it imports, so CI never skips
ort = pytest.importorskip("onnxruntime")
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.modules import Conv  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

# float64: every fused op is within a few eps64 (2.2e-16) of ATen's SiLU, and the 57
# convolutions of the network amplify that by far less than the 1e6 that 1e-10 relative
# allows (measured: 2e-13); a wrong derivative term is off by O(1).
F64 = dict(rtol=1e-10, atol=1e-12)


def models():
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.args = get_cfg()  # the default hyperparameters, for its loss
    fused = fusedact.convert(copy.deepcopy(model))
    convs = [m for m in fused.modules() if isinstance(m, Conv)]
    assert len(convs) > 50 and all(isinstance(c.act, fusedact.nn.Swish) for c in convs)
    assert all(isinstance(c.bn, fusedact.nn.BatchNormAct2d) and c.bn.act is c.act for c in convs)
    assert not any(isinstance(m, torch.nn.SiLU) for m in fused.modules())
    return model, fused


def batch(x):
    return {
        "img": x,
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0], [1.0]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]]),
    }


def test_yolo_converted_forward_and_training_step_match():
    model, fused = (m.double() for m in models())
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[0], model(x)[0], **F64)
    model.train(), fused.train()
    with torch.profiler.profile() as prof:
        fused.loss(batch(x))[0].sum().backward()
    # the fused kernels ran: BatchNorm + SiLU blocks (convert's fuse_bn)
    assert sum(e.name == "fusedact::bn_act_grad" for e in prof.events()) > 50
    model.loss(batch(x))[0].sum().backward()
    compared = 0
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(
            q.grad, p.grad, rtol=F64["rtol"], atol=1e-10 * p.grad.abs().max().item(), msg=lambda m: f"{name}: {m}"
        )
        compared += 1
    assert compared > 100


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_yolo_onnx_export_runs_in_onnxruntime(tmp_path, dynamo):
    model, fused = models()
    model.eval(), fused.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "yolo.onnx"
    kw = (
        dict(dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=16)},))
        if dynamo
        else dict(dynamic_axes={"images": {0: "batch"}})
    )
    torch.onnx.export(fused, (x,), str(path), dynamo=dynamo, input_names=["images"], **kw)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        xb = torch.rand(b, 3, 64, 64, generator=torch.Generator().manual_seed(b))
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0])
        with torch.no_grad():
            want = model(xb)[0]
        # float32 through 57 layers in two runtimes (their convolutions sum in other
        # orders). Box coordinates (rows 0-3, pixels up to a few hundred): a few float32
        # ulp of the largest (measured: half an ulp of 480, 1.5e-5; 16 ulp allowed).
        # Class scores (sigmoids, in [0, 1]): the float32 tolerance (measured: 3.4e-8).
        box_atol = 16 * torch.finfo(torch.float32).eps * want[:, :4].abs().max().item()
        torch.testing.assert_close(got[:, :4], want[:, :4], rtol=TOL[torch.float32]["rtol"], atol=box_atol)
        torch.testing.assert_close(got[:, 4:], want[:, 4:], **TOL[torch.float32])
