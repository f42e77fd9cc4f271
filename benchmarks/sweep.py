"""The sweep: which ops, dtypes, sizes, shapes, layouts and betas run by default on the
CPU and on a GPU, the cases they make, and the sweep's table."""

from __future__ import annotations

import math
import sys

from fusedact._opinfo import get
from cases import run_case
from harness import Progress, csv_writer


def fill_defaults(args):
    """The axes args leaves unset (None), for args.device: a GPU sweeps 2^16 to 2^26
    elements in three dtypes and both betas, the CPU 2^12 to 2^20 elements and a
    backbone stage in float32 and bfloat16, beta per channel (--quick: fewer sizes,
    two dtypes and beta per channel everywhere)."""
    on_gpu = args.device == "cuda"
    if args.sizes is None:
        args.sizes = (
            ([16, 20, 24, 26] if not args.quick else [20, 26]) if on_gpu else ([12, 16, 20] if not args.quick else [20])
        )
    if args.shapes is None:
        # the first stage of a ResNet/YOLO backbone at batch 32: the CPU's real-model case
        args.shapes = [] if on_gpu else ["32x64x56x56"]
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16", "float16"] if (on_gpu and not args.quick) else ["float32", "bfloat16"]
    if args.betas is None:
        args.betas = ["channel", "sample"] if (on_gpu and not args.quick) else ["channel"]


def sweep_cases(args):
    """[(op, dtype, numel, layout, beta, shape or None)]: each size, then each shape;
    acon_c in every layout and beta, the other ops contiguous."""
    cases = []
    for op in args.ops:
        layouts = args.layouts if get(op).channel_dim else ["contiguous"]
        betas = args.betas if get(op).channel_dim else ["-"]
        for dt in args.dtypes:
            for size in args.sizes:
                cases += [(op, dt, 1 << size, lay, b, None) for lay in layouts for b in betas]
            for shape in args.shapes:
                cases += [(op, dt, math.prod(shape), lay, b, shape) for lay in layouts for b in betas]
    return cases


def run(args, meta, csv_path):
    """Times every case of args into a new CSV at csv_path, then prints the table."""
    cases = sweep_cases(args)
    print(
        f"fusedact benchmark on {meta['device']}: torch {meta['torch']}, CUDA {meta['cuda'] or '-'}, "
        f"triton {meta['triton'] or '-'}, fusedact {meta['fusedact']}"
        + (f"; instruction sets: {meta['isa']}" if meta["isa"] else "")
        + f"; {len(cases)} cases",
        flush=True,
    )
    rows = []
    progress = Progress(len(cases))
    with csv_writer(csv_path) as (fh, writer):
        for *case, shape in cases:
            run_case(*case, args, args.device, meta, writer, rows, progress, shape)
            fh.flush()
    print()
    print_table(rows)


def print_table(rows, out=sys.stdout):
    """time, GB/s, % of copy and speedups, one line per (case, mode, provider)."""
    hdr = (
        f"{'op':<10} {'dtype':<8} {'layout':<13} {'beta':<7} {'numel':>10} {'mode':<16} {'provider':<8} "
        f"{'ms':>9} {'GB/s':>7} {'%copy':>6} {'x eager':>8} {'x comp':>7}"
    )
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for r in rows:
        if r["metric"] != "time":
            continue
        if r["status"] != "ok":
            print(
                f"{r['op']:<10} {r['dtype']:<8} {r['layout']:<13} {r['beta']:<7} {r['numel']:>10} {r['mode']:<16} "
                f"{r['provider']:<8} {r['status']}",
                file=out,
            )
            continue
        print(
            f"{r['op']:<10} {r['dtype']:<8} {r['layout']:<13} {r['beta']:<7} {r['numel']:>10} {r['mode']:<16} "
            f"{r['provider']:<8} {float(r['p50']):9.4f} {float(r['gbps']):7.1f} {float(r['pct_copy']):6.1f} "
            f"{r.get('speedup_vs_eager') or '':>8} {r.get('speedup_vs_compile') or '':>7}",
            file=out,
        )
    mem = [r for r in rows if r["metric"] != "time" and r["status"] == "ok"]
    if mem:
        print("\nmemory of one forward+backward (MiB): saved by the autograd graph / peak beyond inputs", file=out)
        keyed = {}
        for r in mem:
            keyed.setdefault((r["op"], r["dtype"], r["layout"], r["beta"], r["numel"], r["provider"]), {})[
                r["metric"]
            ] = float(r["p50"])
        for (op, dt, lay, beta, n, p), m in keyed.items():
            pk = m.get("peak_bytes")
            print(
                f"{op:<10} {dt:<8} {lay:<13} {beta:<7} {n:>10} {p:<8} saved {m.get('saved_bytes', float('nan')) / 2**20:9.2f}"  # noqa: E501
                + (f"  peak {pk / 2**20:9.2f}" if pk is not None else ""),
                file=out,
            )
