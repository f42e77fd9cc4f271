"""Training steps of whole models before and after fusedact.convert, eager and compiled.

For each model: the original and the converted model (fusedact.convert of a deep copy,
same weights), eager and under torch.compile (the converted one once per
fusedact.config.compile mode), one training step each (zero grads, forward, loss,
backward) in alternating rounds in one process: a round times every variant, in an
order that flips each round, and a speed is the median over rounds of the ratio of
the two variants' times within the round (the host's memory bandwidth drifts for
seconds at a time). Saved bytes: the distinct storages the autograd graph of one step
saves (parameters excluded), counted with saved-tensor hooks.

    python benchmarks/models.py                      # every model, this machine
    python benchmarks/models.py --models yolo11n --rounds 5 --compile-modes auto fuse
    python benchmarks/models.py --device cuda        # the GPU (default where there is one)

A model whose package (ultralytics, timm) is not installed is skipped with a line that
says so; the ACON model needs only torch.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no update checks or downloads

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fusedact  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from harness import saved_bytes, steady_malloc, versions  # noqa: E402

RESULTS = Path(__file__).parent / "results"


# ---- the models


class AconC(nn.Module):  # YOLOv5's utils/activations.py AconC (eager)
    def __init__(self, c1):
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, c1, 1, 1))

    def forward(self, x):
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(self.beta * dpx) + self.p2 * x


class MetaAconC(nn.Module):  # YOLOv5's MetaAconC (eager)
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


def acon_yolov5(width=32):
    """Five YOLOv5 Conv blocks (conv, BatchNorm, ACON), AconC and MetaAconC in turn."""
    layers, c = [], 3
    for i, (w, stride) in enumerate([(width, 2), (width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2)]):
        layers += [
            nn.Conv2d(c, w, 3, stride, 1, bias=False),
            nn.BatchNorm2d(w),
            AconC(w) if i % 2 == 0 else MetaAconC(w),
        ]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def yolo11n():
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolo11n.yaml", nc=80, verbose=False)


def timm_model(name, **kwargs):
    import timm

    return lambda: timm.create_model(name, pretrained=False, num_classes=100, **kwargs)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out
    return [t for item in items for t in _tensors(item)]


def _feature_loss(out):
    """For a detector's raw outputs (tensors, in lists or dicts): the mean square of each."""
    return sum(o.float().square().mean() for o in _tensors(out))


def _class_loss(out, labels):
    return nn.functional.cross_entropy(out.float(), labels)


# name -> (builder, input shape, loss(out, labels) or None for a feature loss)
MODELS = {
    "yolo11n": (yolo11n, (4, 3, 256, 256), None),
    "efficientnet_b0": (timm_model("efficientnet_b0"), (8, 3, 224, 224), _class_loss),
    "mobilenetv3_large_100": (timm_model("mobilenetv3_large_100"), (8, 3, 224, 224), _class_loss),
    "resnet26_mish": (timm_model("resnet26", act_layer="mish"), (8, 3, 224, 224), _class_loss),
    "acon_yolov5": (acon_yolov5, (16, 3, 128, 128), _class_loss),
}


# ---- one training step


def make_step(model, x, labels, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        out = model(x)
        loss = _feature_loss(out) if loss_fn is None else loss_fn(out, labels)
        loss.backward()

    return step


def graph_bytes(model, x, labels, loss_fn):
    """Bytes of the distinct non-parameter storages the autograd graph of one step saves."""
    saved, out = saved_bytes(lambda: model(x), exclude=list(model.parameters()))
    loss = _feature_loss(out) if loss_fn is None else loss_fn(out, labels)
    loss.backward()
    return saved


def time_steps(step, min_time, device="cpu"):
    """Median seconds of one step over about min_time seconds (at least 3 steps); on a
    GPU each step is timed to the end of its kernels."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    sync()
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_model(name, args, writer, meta):
    build, shape, loss_fn = MODELS[name]
    torch.manual_seed(0)
    try:
        original = build().train().to(args.device)
    except ImportError as e:  # ultralytics or timm not installed here
        print(f"{name}: skipped ({e})", file=sys.stderr)
        return
    converted = fusedact.convert(copy.deepcopy(original))
    x = torch.randn(*shape, device=args.device)
    labels = torch.randint(0, 10, (shape[0],), device=args.device)
    variants = {}
    if "eager" in args.modes:
        variants["original eager"] = original
        if args.control:  # an A/A pair: what the harness reads for two equal models
            variants["original eager again"] = copy.deepcopy(original)
        variants["converted eager"] = converted
    if "compiled" in args.modes:
        variants["original compiled"] = torch.compile(copy.deepcopy(original))
        if args.control:  # an A/A pair: what the harness reads for two equal models
            variants["original compiled again"] = torch.compile(copy.deepcopy(original))
        for mode in args.compile_modes:
            # the mode is read while the graph compiles: the first step, under it
            variants[f"converted compiled {mode}"] = (mode, torch.compile(copy.deepcopy(converted)))
    steps, saved = {}, {}
    for label, v in variants.items():
        mode, model = v if isinstance(v, tuple) else (fusedact.config.compile, v)
        step = make_step(model, x, labels, loss_fn)
        before = fusedact.config.compile
        fusedact.config.compile = mode
        try:
            t0 = time.perf_counter()
            step()  # compiles
            compile_s = time.perf_counter() - t0
            step()
            saved[label] = graph_bytes(model, x, labels, loss_fn)
        finally:
            fusedact.config.compile = before
        steps[label] = step
        print(f"{name}: {label}: first step {compile_s:.1f} s, saves {saved[label] / 1e6:.1f} MB", file=sys.stderr)
    per_round = {label: [] for label in steps}
    labels_order = list(steps)
    for r in range(args.rounds):
        for label in labels_order if r % 2 == 0 else labels_order[::-1]:
            per_round[label].append(time_steps(steps[label], args.min_time, args.device))
    pairs = [("original eager", "converted eager")]
    pairs += [("original compiled", f"converted compiled {m}") for m in args.compile_modes]
    pairs += [("original eager", "original eager again"), ("original compiled", "original compiled again")]
    for ref, label in [(a, b) for a, b in pairs if a in per_round and b in per_round]:
        ratios = [a / b for a, b in zip(per_round[ref], per_round[label])]
        row = dict(
            meta,
            model=name,
            input=str(tuple(shape)),
            variant=label,
            reference=ref,
            ms=f"{statistics.median(per_round[label]) * 1e3:.2f}",
            reference_ms=f"{statistics.median(per_round[ref]) * 1e3:.2f}",
            speed=f"{statistics.median(ratios):.3f}",
            speed_min=f"{min(ratios):.3f}",
            speed_max=f"{max(ratios):.3f}",
            saved_mb=f"{saved[label] / 1e6:.2f}",
            reference_saved_mb=f"{saved[ref] / 1e6:.2f}",
            rounds=args.rounds,
        )
        writer.writerow(row)
        print(
            f"| {name} | {label} | {row['reference_ms']} ms | {row['ms']} ms | {row['speed']}x "
            f"({row['speed_min']}-{row['speed_max']}) | {row['reference_saved_mb']} MB | {row['saved_mb']} MB |"
        )
        sys.stdout.flush()


FIELDS = [
    "date",
    "device",
    "torch",
    "cuda",
    "triton",
    "fusedact",
    "isa",
    "threads",
    "model",
    "input",
    "variant",
    "reference",
    "reference_ms",
    "ms",
    "speed",
    "speed_min",
    "speed_max",
    "reference_saved_mb",
    "saved_mb",
    "rounds",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument(
        "--compile-modes", nargs="+", default=["auto", "fuse", "kernel"], choices=fusedact.config.COMPILE_MODES
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--control", action="store_true", help="also time a second copy of the original (eager, compiled)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of steps per variant and round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--system-malloc", action="store_true", help="leave glibc malloc as is (harness.steady_malloc)")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = dict(versions(args.device), threads=torch.get_num_threads())
    if args.device == "cpu" and not args.system_malloc:
        meta["device"] += f", malloc: {steady_malloc()}"
    where = "cuda" if args.device == "cuda" else f"cpu-{torch.get_num_threads()}-threads"
    path = Path(args.csv) if args.csv else RESULTS / f"models-{where}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"# {meta['device']}, torch {meta['torch']}, {meta['date']}")
    print("| model | variant | reference | variant | speed (rounds) | reference saves | variant saves |")
    print("|---|---|---|---|---|---|---|")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for name in args.models:
            run_model(name, args, writer, meta)
            f.flush()
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
