"""CPU benchmark: fusedact native against eager PyTorch, forward and forward+backward.

Eager is F.silu, F.mish, F.hardswish and the eager ACON-C module of the paper's code
(d x sigmoid(beta d x) + p2 x with (1, C, 1, 1) parameters). Each provider's result
is checked against the other before timing; times are torch.utils.benchmark medians,
the providers taking turns.
Writes one CSV row per measurement (device, versions, date) and prints a table.

    python benchmarks/bench_cpu.py [--shape 32 64 56 56] [--dtype float32] [--ops ...]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import fusedact

OPS = ["swish", "mish", "hard_swish", "acon_c"]


def eager_acon_c(x, p1, p2, beta):
    dpx = (p1 - p2) * x
    return dpx * torch.sigmoid(beta * dpx) + p2 * x


def providers(op, x):
    """{name: (fn, params)} for op on x; params get gradients in forward+backward."""
    C = x.shape[1]
    if op == "acon_c":
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(1, C, 1, 1, generator=g), torch.randn(1, C, 1, 1, generator=g), torch.ones(1, C, 1, 1)]
        params = [p.to(x.dtype) for p in params]
        return {"eager": (eager_acon_c, params), "fusedact": (fusedact.acon_c, params)}
    eager = {"swish": F.silu, "mish": F.mish, "hard_swish": F.hardswish}[op]
    return {"eager": (eager, []), "fusedact": (getattr(fusedact, op), [])}


def timed_alternating(cases, min_run_time, rounds):
    """{name: median seconds}: the providers are timed in turns, `rounds` times each,
    and each gets the median of its rounds' medians. On a small shared machine the
    cost of large allocations (page faults) depends on what ran just before; taking
    turns spreads that over every provider instead of favouring one."""
    timers = {name: benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
              for name, (stmt, env) in cases.items()}
    samples = {name: [] for name in cases}
    for _ in range(rounds):
        for name, t in timers.items():
            samples[name].append(t.blocked_autorange(min_run_time=min_run_time / rounds).median)
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs="+", default=[32, 64, 56, 56])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="turns each provider takes")
    ap.add_argument("--csv", default=None, help="CSV path (default benchmarks/results/cpu-<model>-<cores>c.csv)")
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    x = torch.randn(*args.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    n = x.numel()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = fusedact.build_info()
    meta = dict(device=f"cpu: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {info['cpu_isa']})",
                torch=torch.__version__, fusedact=fusedact.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    rows = []
    print(f"# {meta['device']}, torch {meta['torch']}, fusedact {meta['fusedact']}, {meta['date']}")
    print(f"# x {tuple(args.shape)} {args.dtype} ({n * x.element_size() / 2**20:.0f} MiB), medians")
    print(f"{'op':<11} {'mode':<9} {'eager ms':>9} {'fused ms':>9} {'speedup':>8}")
    for op in args.ops:
        provs = providers(op, x)
        # correctness first: the providers agree
        (fe, pe), (ff, pf) = provs["eager"], provs["fusedact"]
        torch.testing.assert_close(ff(x, *pf), fe(x, *pe), rtol=1e-4, atol=1e-4)
        for mode in ("forward", "forward+backward"):
            cases = {}
            for name, (fn, params) in provs.items():
                if mode == "forward":
                    env = dict(fn=fn, x=x, params=params)
                    stmt = "fn(x, *params)"
                else:
                    xg = x.detach().requires_grad_()
                    pg = [p.detach().requires_grad_() for p in params]
                    gy = torch.randn_like(x)
                    env = dict(fn=fn, x=xg, params=pg, gy=gy, grad=torch.autograd.grad)
                    stmt = "grad(fn(x, *params), [x, *params], gy)"
                cases[name] = (stmt, env)
            times = timed_alternating(cases, args.min_run_time, args.rounds)
            speedup = times["eager"] / times["fusedact"]
            print(f"{op:<11} {mode:<9} {times['eager'] * 1e3:9.2f} {times['fusedact'] * 1e3:9.2f} {speedup:7.2f}x")
            for name, t in times.items():
                rows.append(dict(meta, op=op, mode=mode, provider=name, dtype=args.dtype,
                                 shape="x".join(map(str, args.shape)), numel=n, median_ms=f"{t * 1e3:.4f}",
                                 speedup_vs_eager=f"{times['eager'] / t:.3f}"))
    slug = "-".join("".join(ch if ch.isalnum() else " " for ch in cpu.lower()).split())
    out = Path(args.csv) if args.csv else Path(__file__).parent / "results" / f"cpu-{slug}-{os.cpu_count()}c.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"# CSV: {out}")


if __name__ == "__main__":
    sys.exit(main())
