"""The cases of the sweep: each op's providers, its tensors, the float64 check of every
provider, and one case timed in every mode (benchmarks/bench.py runs them)."""

from __future__ import annotations

import math

import torch

import fusedact
from fusedact import reference
from fusedact._opinfo import NAMES, get
from harness import bench_cpu, bench_gpu, copy_time, paired_speedup, peak_bytes, saved_bytes

OPS = list(NAMES)  # fusedact/_opinfo.py
PROVIDERS = ["eager", "compile", "native", "triton"]
MODES = ["forward", "backward", "forward+backward", "memory"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOOR_ELEMENT_PASSES = {"forward": 2, "backward": 3, "forward+backward": 5}
ACON_C = 64  # channels of the acon_c benchmark tensors: (N, 64, 32, 32) and friends


def make_case(op, dtype, numel, layout, beta_kind, device, shape=None):
    """x, the incoming gradient, parameters (as the eager module holds them) and the
    shape; sizes are rounded to whole tensors of the op's shape, unless `shape` is given
    (NCHW: acon_c's channels are its dim 1)."""
    gen = torch.Generator().manual_seed(0)
    if shape is not None:
        shape = tuple(shape)
    elif get(op).channel_dim:
        hw = 32 * 32
        n = max(1, numel // (ACON_C * hw))
        shape = (n, ACON_C, 32, 32)
    else:
        shape = (max(1, numel // 1024), 1024)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    params = []
    if get(op).channel_dim:
        pdt = torch.float32  # parameters stay float32, as under autocast (docs/SPEC.md)
        pshape = (1, shape[1], 1, 1)
        bshape = (shape[0], shape[1], 1, 1) if beta_kind == "sample" else pshape
        params = [
            torch.randn(pshape, generator=gen).to(pdt),
            torch.randn(pshape, generator=gen).to(pdt),
            (1 + 0.5 * torch.randn(bshape, generator=gen)).to(pdt),
        ]
        params = [p.to(device) for p in params]
    return x, g, params, shape


def fns(op):
    """{provider: f(x, *params)}. native is the call users write, `fusedact.mish(x)` (the
    default backend): with caches cold after a large tensor, the keyword
    `backend="native"` alone costs about 0.5 us a call (2^20 elements, 2 threads)."""
    info = get(op)
    eager = info.eager
    f = info.function()

    def fused(backend):
        if info.unary:  # no *params to pack: the call users write, nothing more
            return (lambda x: f(x)) if backend == "native" else (lambda x: f(x, backend=backend))
        if backend == "native":
            return lambda x, *params: f(x, *params)
        return lambda x, *params: f(x, *params, backend=backend)

    return {"eager": eager, "compile": eager, "native": fused("native"), "triton": fused("triton")}


def reference64(op, x, params):
    xs = x.detach().double().requires_grad_()
    ps = [p.detach().double() for p in params]
    y = getattr(reference, op)(xs, *ps)
    return xs, y


def check(op, provider, x, g, params, f):
    """Forward output and dx of f against float64: relative L2 error within the dtype's
    bound (a few units of its rounding: 1e-5 float32, 1e-2 bfloat16/float16)."""
    xl = x.detach().requires_grad_()
    y = f(xl, *params)
    (dx,) = torch.autograd.grad(y, xl, g)
    x64, y64 = reference64(op, x, params)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    bound = 1e-5 if x.dtype == torch.float32 else 1e-2
    for name, a, b in (("y", y, y64), ("dx", dx, dx64)):
        err = ((a.double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-300)).item()
        if not err <= bound:
            return f"{provider} {name} off: rel L2 error {err:.2e} > {bound:.0e}"
    return ""


def run_case(op, dtype_name, numel, layout, beta_kind, args, device, meta, writer, rows, progress, shape=None):
    dtype = DTYPES[dtype_name]
    x, g, params, shape = make_case(op, dtype, numel, layout, beta_kind, device, shape)
    n = x.numel()
    es = x.element_size()
    copy_ms = copy_time(n, dtype, device, args)[0]
    copy_gbps = 2 * n * es / copy_ms / 1e6
    all_fns = fns(op)
    providers = [
        p for p in args.providers if not (p == "triton" and (device != "cuda" or not fusedact.triton.available()))
    ]
    if device == "cuda" or "compile" in providers:
        torch._dynamo.reset()
    funcs, status = {}, {}
    for p in providers:
        f = all_fns[p]
        if p == "compile":
            f = torch.compile(f, dynamic=False)
        try:
            status[p] = check(op, p, x, g, params, f)
        except Exception as e:  # a provider that cannot run this case is reported, not fatal
            status[p] = f"{p} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        funcs[p] = f

    leaves_p = [p.detach().requires_grad_() for p in params]
    xl = x.detach().requires_grad_()
    inputs = [xl] + leaves_p
    results = {}  # (provider, mode) -> (p50, p20, p80)
    rounds = {}  # CPU: (provider, mode) -> [each round's median]
    for mode in [m for m in args.modes if m != "memory"]:
        runs = {}
        for p, f in funcs.items():
            if status[p]:
                continue
            if mode == "forward":
                runs[p] = lambda f=f: f(xl, *leaves_p)
            elif mode == "forward+backward":
                runs[p] = lambda f=f: torch.autograd.grad(f(xl, *leaves_p), inputs, g)
            else:
                y = f(xl, *leaves_p)
                runs[p] = lambda y=y: torch.autograd.grad(y, inputs, g, retain_graph=True)
        if device == "cuda":
            for p, r in runs.items():
                results[(p, mode)] = bench_gpu(r, args.warmup_ms, args.rep_ms)
        elif runs:
            times, per_round = bench_cpu(runs, args.min_run_time, args.rounds)
            results.update({(p, mode): t for p, t in times.items()})
            rounds.update({(p, mode): t for p, t in per_round.items()})
        runs.clear()

    base = {
        "op": op,
        "dtype": dtype_name,
        "layout": layout,
        "beta": beta_kind if get(op).channel_dim else "",
        "numel": n,
        "shape": "x".join(map(str, shape)),
        **meta,
    }
    for mode in [m for m in args.modes if m != "memory"]:
        nbytes = FLOOR_ELEMENT_PASSES[mode] * n * es
        for p in providers:
            row = dict(base, provider=p, mode=mode, metric="time", unit="ms", copy_gbps=f"{copy_gbps:.1f}")
            if (p, mode) not in results:
                row["status"] = status[p] or "not run"
            else:
                t50, t20, t80 = results[(p, mode)]
                gbps = nbytes / t50 / 1e6
                row.update(
                    p50=f"{t50:.5f}",
                    p20=f"{t20:.5f}",
                    p80=f"{t80:.5f}",
                    gbps=f"{gbps:.1f}",
                    pct_copy=f"{100 * gbps / copy_gbps:.1f}",
                    status="ok",
                )
                for ref in ("eager", "compile"):
                    if (ref, mode) not in results:
                        continue
                    if (p, mode) in rounds:  # CPU: paired rounds
                        ratio, each = paired_speedup(rounds, (ref, mode), (p, mode))
                        if ref == "eager" and p != "eager":
                            row["eager_round_ratios"] = ";".join(f"{v:.3f}" for v in each)
                    else:
                        ratio = results[(ref, mode)][0] / t50
                    row[f"speedup_vs_{ref}"] = f"{ratio:.3f}"
            writer.writerow(row)
            rows.append(row)
    if "memory" in args.modes:
        for p, f in funcs.items():
            row = dict(base, provider=p, mode="memory", metric="saved_bytes", unit="bytes")
            if status[p]:
                row["status"] = status[p]
            else:
                try:
                    sb, _ = saved_bytes(lambda: torch.autograd.grad(f(xl, *leaves_p), inputs, g))
                    pk = peak_bytes(lambda: torch.autograd.grad(f(xl, *leaves_p), inputs, g), device)
                    row.update(p50=str(sb), status="ok")
                    writer.writerow(row)
                    rows.append(row)
                    row = dict(
                        base,
                        provider=p,
                        mode="memory",
                        metric="peak_bytes",
                        unit="bytes",
                        p50="" if math.isnan(pk) else str(pk),
                        status="ok" if not math.isnan(pk) else "cpu: not measured",
                    )
                except Exception as e:
                    row["status"] = f"failed: {type(e).__name__}"
            writer.writerow(row)
            rows.append(row)
    progress.step(f"{op} {dtype_name} {layout} {beta_kind} " + "x".join(map(str, shape)))
