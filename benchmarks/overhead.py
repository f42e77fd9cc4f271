"""The call-overhead case (bench.py --overhead): what a call costs beyond its kernel,
fused against eager, on small tensors on one CPU thread."""

from __future__ import annotations

import sys

import torch

import fusedact
from fusedact._opinfo import get
from cases import check, fns
from harness import bench_cpu, csv_writer, paired_speedup

OVERHEAD_SIZES = [8, 12, 16]
OVERHEAD_MODES = ["forward (no grad)", "forward+backward"]


def overhead_case(op, numel):
    """x (and g, params) for the overhead case: 1-D for the unary ops, (4, 16, L) with
    per-channel (16,) parameters for acon_c."""
    gen = torch.Generator().manual_seed(0)
    shape = (4, 16, max(1, numel // 64)) if get(op).channel_dim else (numel,)
    x = torch.randn(shape, generator=gen) * 3
    params = []
    if get(op).channel_dim:
        params = [
            torch.randn(1, 16, 1, generator=gen),
            torch.randn(1, 16, 1, generator=gen),
            1 + 0.5 * torch.rand(1, 16, 1, generator=gen),
        ]
    return x, torch.randn(shape, generator=gen), params


def run_overhead(args, meta, writer, rows):
    """No-grad forward and forward+backward of tiny tensors on one thread: what a call
    costs beyond its kernel, fused against eager (F.silu, F.mish, F.hardswish, the
    ACON-C module's five ops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for op in args.ops:
            all_fns = fns(op)
            for size in args.sizes:
                x, g, params = overhead_case(op, 1 << size)
                if get(op).channel_dim:  # fusedact takes (C,) parameters for channel_dim=1 on any rank
                    native = lambda x, p1, p2, b: fusedact.acon_c(x, p1.reshape(-1), p2.reshape(-1), b.reshape(-1))  # noqa: E731
                else:
                    native = all_fns["native"]
                funcs = {"eager": all_fns["eager"], "native": native}
                for p, f in funcs.items():  # checked against float64 before it is timed
                    status = check(op, p, x, g, params, f)
                    if status:
                        raise RuntimeError(status)
                xl = x.requires_grad_()
                leaves = [p.requires_grad_() for p in params]
                runs = {}
                for p, f in funcs.items():
                    runs[(p, OVERHEAD_MODES[0])] = lambda f=f: _no_grad_call(f, x, params)
                    runs[(p, OVERHEAD_MODES[1])] = lambda f=f: torch.autograd.grad(f(xl, *leaves), [xl] + leaves, g)
                times, per_round = bench_cpu(runs, args.min_run_time, args.rounds)
                for mode in OVERHEAD_MODES:
                    for p in funcs:
                        t50, t20, t80 = times[(p, mode)]
                        row = dict(
                            meta,
                            op=op,
                            dtype="float32",
                            layout="contiguous",
                            beta="channel" if get(op).channel_dim else "",
                            numel=x.numel(),
                            shape="x".join(map(str, x.shape)),
                            provider=p,
                            mode=f"overhead: {mode}, 1 thread",
                            metric="time",
                            unit="ms",
                            p50=f"{t50:.5f}",
                            p20=f"{t20:.5f}",
                            p80=f"{t80:.5f}",
                            status="ok",
                        )
                        if p != "eager":
                            ratio, each = paired_speedup(per_round, ("eager", mode), (p, mode))
                            row["speedup_vs_eager"] = f"{ratio:.3f}"
                            row["eager_round_ratios"] = ";".join(f"{v:.3f}" for v in each)
                        writer.writerow(row)
                        rows.append(row)
    finally:
        torch.set_num_threads(before)


def _no_grad_call(f, x, params):
    with torch.no_grad():
        return f(x, *params)


def print_overhead_table(rows, out=sys.stdout):
    print(f"{'op':<11}{'numel':>8}  {'mode':<38}{'eager us':>10}{'native us':>11}{'native/eager':>14}", file=out)
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], int(r["numel"]), r["mode"]), {})[r["provider"]] = float(r["p50"]) * 1e3
    for (op, n, mode), t in by_key.items():
        print(
            f"{op:<11}{n:>8}  {mode:<38}{t['eager']:>10.2f}{t['native']:>11.2f}{t['native'] / t['eager']:>13.2f}x",
            file=out,
        )


def run(args, meta, csv_path):
    """Times every case of args into a new CSV at csv_path, then prints the table."""
    rows = []
    with csv_writer(csv_path) as (_, writer):
        run_overhead(args, meta, writer, rows)
    print_overhead_table(rows)
