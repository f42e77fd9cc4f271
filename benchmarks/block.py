"""The --block case: BatchNorm + activation, one training step (forward + backward) of
the block, fused (fusedact.nn.BatchNormAct2d) against nn.BatchNorm2d followed by the
activation in eager PyTorch and against torch.compile of that eager block; the time
ratio from alternating rounds, and the bytes the autograd graph saves beyond x and the
parameters. Each provider's y, dx and dweight are checked against float64 first. On a GPU
(--device cuda) "fused" runs the native CUDA passes (fusedact.config.cuda_bn_passes), timed
with triton's do_bench, and its forward is also timed against the bytes-moved bound."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fusedact
from harness import bench_cpu, bench_gpu, copy_time, csv_writer, paired_speedup, saved_bytes

BLOCK_SHAPES = [(32, 64, 56, 56), (16, 128, 40, 40)]
BLOCK_ACTS = ["silu", "mish", "hard_swish", "acon_c"]
FIELDS = [
    "date",
    "device",
    "torch",
    "fusedact",
    "isa",
    "act",
    "dtype",
    "shape",
    "layout",
    "provider",
    "p50_ms",
    "p20_ms",
    "p80_ms",
    "speedup_vs_eager",
    "round_ratios",
    "saved_bytes",
    "threads",
    "fwd_ms",
    "fwd_pct_bound",
]


class _EagerAcon(nn.Module):
    """YOLOv5's AconC, the eager form users train."""

    def __init__(self, c):
        super().__init__()
        self.p1, self.p2 = nn.Parameter(torch.randn(1, c, 1, 1)), nn.Parameter(torch.randn(1, c, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(self.beta * dpx) + self.p2 * x


def blocks(act: str, C: int):
    """(eager block, fused block) with the same parameters."""
    eager_act = {"silu": nn.SiLU, "mish": nn.Mish, "hard_swish": nn.Hardswish}.get(act)
    eager = nn.Sequential(nn.BatchNorm2d(C), eager_act() if eager_act else _EagerAcon(C))
    with torch.no_grad():
        eager[0].weight.uniform_(0.5, 1.5), eager[0].bias.uniform_(-0.5, 0.5)
    fused_act = fusedact.convert(copy.deepcopy(eager[1]), fuse_bn=False)
    fused = fusedact.nn.BatchNormAct2d.from_modules(copy.deepcopy(eager[0]), fused_act)
    return eager, fused


def _step(block, x, g):
    """One forward and backward. x.grad is cleared first: in a model the block's dx goes
    to the layer before it once; accumulated into a leaf it would add a read of two
    tensors and a write of one to every provider's step (0.4-0.6 ms of 3 at
    (16, 128, 40, 40) bfloat16)."""

    def run():
        x.grad = None
        y = block(x)
        y.backward(g)
        return y

    return run


def _check(name, block, x, g, ref):
    """y and dx against float64: ours must hold the bound; PyTorch's own providers are
    timed anyway and the excess printed (its channels_last BatchNorm in float32 sums in
    float: y ~3e-6, and hard-Swish's dx 4e-4, where its z crosses +-3 on the wrong side)."""
    xs = x.detach().requires_grad_()
    y = block(xs)
    y.backward(g)
    dx = xs.grad
    bound = 1e-4 if x.dtype == torch.float32 else 3e-2
    for what, a, b in (("y", y, ref[0]), ("dx", dx, ref[1])):
        err = ((a.double() - b).norm() / b.norm()).item()
        if err <= bound:
            continue
        if name == "fused":
            raise AssertionError(f"{name} {what}: relative error {err:.3g} > {bound}")
        print(f"note: {name} {what}: relative error {err:.3g} > {bound} (PyTorch's own)", flush=True)


def run(args, meta, csv_path):
    with csv_writer(csv_path, FIELDS) as (f, writer):
        return _run(args, meta, f, writer)


class _Passes(nn.Module):
    """On CUDA: the block with fusedact.config.cuda_bn_passes on for its calls (the native
    passes; off, CUDA runs F.batch_norm then the fused activation)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        before = fusedact.config.cuda_bn_passes
        fusedact.config.cuda_bn_passes = True
        try:
            return self.block(x)
        finally:
            fusedact.config.cuda_bn_passes = before


def _forward_bound(name, block, x, args):
    """GPU: the fused forward's ms and its share of the bytes-moved bound, x read three
    times (two statistics passes, then the normalization) and y written once, at the
    measured copy bandwidth (a copy reads and writes once)."""
    if args.device != "cuda" or name != "fused":
        return "", ""
    with torch.no_grad():
        ms = bench_gpu(lambda: block(x), args.warmup_ms, args.rep_ms)[0]
    copy_ms = copy_time(x.numel(), x.dtype, "cuda", args)[0]
    return f"{ms:.4f}", f"{100 * 2 * copy_ms / (4 * ms):.1f}"


def _run(args, meta, f, writer):
    rows = []
    dtypes = args.dtypes or ["float32", "bfloat16"]
    shapes = args.shapes or BLOCK_SHAPES
    dev = args.device
    cases = [(s, d, a, lay) for s in shapes for d in dtypes for a in args.block_acts for lay in args.block_layouts]
    for shape, dtype_name, act, layout in cases:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        torch.manual_seed(0)
        eager, fused = blocks(act, shape[1])
        eager, fused = eager.to(dev), fused.to(dev)
        if dev == "cuda":
            fused = _Passes(fused)
        x = (torch.randn(shape) * 2 + 0.3).to(dtype).to(dev).to(memory_format=fmt).requires_grad_()
        g = torch.randn(shape).to(dtype).to(dev).to(memory_format=fmt)
        ref_block = copy.deepcopy(eager).double()
        x64 = x.detach().double().requires_grad_()
        y64 = ref_block(x64)
        y64.backward(g.double())
        ref = (y64.detach(), x64.grad)
        providers = {"eager": eager, "fused": fused}
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit across cases
        if "compile" in args.block_providers:
            providers["compile"] = torch.compile(copy.deepcopy(eager))
        providers = {p: m for p, m in providers.items() if p in args.block_providers or p == "eager"}
        for name, block in providers.items():
            _check(name, block, x, g, ref)
        steps = {name: _step(block, x, g) for name, block in providers.items()}
        if dev == "cuda":
            times = {name: bench_gpu(step, args.warmup_ms, args.rep_ms) for name, step in steps.items()}
            per_round = {name: [t[0]] for name, t in times.items()}
        else:
            times, per_round = bench_cpu(steps, args.min_run_time, args.rounds)
        params = [p for m in providers.values() for p in m.parameters()]
        for name in providers:
            nbytes, _ = saved_bytes(steps[name], exclude=[x, *params])
            fwd_ms, fwd_pct = _forward_bound(name, providers[name], x.detach(), args)
            ratio, ratios = paired_speedup(per_round, "eager", name)
            row = dict(
                date=meta.get("date"),
                device=meta.get("device"),
                torch=meta.get("torch"),
                fusedact=meta.get("fusedact"),
                isa=meta.get("isa", ""),
                act=act,
                dtype=dtype_name,
                shape="x".join(map(str, shape)),
                layout=layout,
                provider=name,
                p50_ms=f"{times[name][0]:.3f}",
                p20_ms=f"{times[name][1]:.3f}",
                p80_ms=f"{times[name][2]:.3f}",
                speedup_vs_eager=f"{ratio:.3f}",
                round_ratios=" ".join(f"{r:.3f}" for r in ratios),
                saved_bytes=nbytes,
                threads=torch.get_num_threads(),
                fwd_ms=fwd_ms,
                fwd_pct_bound=fwd_pct,
            )
            writer.writerow(row)
            rows.append(row)
        f.flush()
        line = "  ".join(
            f"{p} {times[p][0]:.2f} ms ({paired_speedup(per_round, 'eager', p)[0]:.2f}x)" for p in providers
        )
        shape_s = "x".join(map(str, shape)) + (" CL" if layout == "channels_last" else "")
        print(f"{act:<10} {dtype_name:<8} {shape_s:<17} {line}", flush=True)
    return rows
