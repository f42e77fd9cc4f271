"""fusedact's benchmark: provider x mode x op x dtype x size x layout, side by side in one run.

Providers
  eager     F.silu, F.mish, F.hardswish, and the eager ACON-C module of the paper's code
            and YOLOv5 (d x sigmoid(beta d x) + p2 x)
  compile   torch.compile of that eager code (inductor, static shapes, one compile per case)
  native    fusedact's C++/CUDA kernels
  triton    fusedact's Triton kernels (GPU only: on the CPU Triton only has its interpreter)
Modes: forward, backward (the backward alone, from a kept graph), forward+backward, and
memory (peak memory of a forward+backward beyond its inputs, on a GPU; the bytes the
autograd graph saves, everywhere).

Method. GPU: CUDA-event timing by triton.testing.do_bench (warm-up, L2 flushed before
every run), the median and the 20/80 quantiles; a device-to-device copy is timed in the
same run and every figure is also given as % of its bandwidth, the bytes floor being
2 N size (forward), 3 N size (backward), 5 N size (both). CPU: torch.utils.benchmark
medians, the providers timed in alternating rounds (A B, B A, ...; on a small shared
machine the cost of large allocations depends on what ran just before, and the memory
bandwidth changes for seconds at a time), 9 by default; a CPU speedup is the median over
rounds of the two providers' ratio within a round (the CSV's eager_round_ratios lists
them), p50/p20/p80 the quantiles of all rounds' samples. Each provider's forward output
and input gradient are checked against a float64 reference before it is timed.

Writes one CSV row per measurement (device, torch/CUDA/triton/fusedact versions, date),
prints a table, and leaves the plots to benchmarks/plot.py.

    python benchmarks/bench.py                 # the default sweep for this machine
    python benchmarks/bench.py --quick         # a few sizes, fp32 and bf16
    python benchmarks/bench.py --ops acon_c --dtypes bfloat16 --sizes 24 26 --modes forward

The code: harness.py (timing, memory, versions, CSV), cases.py (each op's providers, the
float64 check, one case), sweep.py (the default sweep per device, its table),
overhead.py (--overhead); README.md says how to run and read them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import block
import overhead
import sweep
from cases import DTYPES, MODES, OPS, PROVIDERS
from harness import ROOT, results_csv, steady_malloc, versions


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if gpu else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    ap.add_argument("--sizes", nargs="*", type=int, default=None, help="log2 of the element counts")
    ap.add_argument(
        "--shapes",
        nargs="*",
        default=None,
        help="explicit NCHW shapes as well, e.g. 32x64x56x56 (acon_c's channels are dim 1)",
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument(
        "--layouts",
        nargs="+",
        default=["contiguous", "channels_last"],
        choices=["contiguous", "channels_last"],
        help="acon_c's layouts (NCHW, channels_last)",
    )
    ap.add_argument(
        "--betas",
        nargs="+",
        default=None,
        choices=["channel", "sample"],
        help="acon_c's beta: per channel (ACON-C) or per sample (Meta-ACON)",
    )
    ap.add_argument("--quick", action="store_true", help="a few sizes, float32 and bfloat16, per-channel beta")
    ap.add_argument("--csv", default=None, help="where the CSV goes (default benchmarks/results/<device>.csv)")
    ap.add_argument("--plot", action="store_true", help="then run benchmarks/plot.py on the CSV")
    ap.add_argument(
        "--overhead",
        action="store_true",
        help="the call-overhead case instead: tensors of 2^8, 2^12, 2^16 elements (or --sizes), "
        "one thread, CPU, no-grad forward and forward+backward, native against eager",
    )
    ap.add_argument(
        "--block",
        action="store_true",
        help="the BatchNorm + activation block instead (benchmarks/block.py): a training step, fused "
        "against nn.BatchNorm2d + the eager activation and torch.compile of it; CPU, or a GPU with --device "
        "cuda (the native CUDA passes)",
    )
    ap.add_argument("--block-acts", nargs="+", default=block.BLOCK_ACTS, choices=block.BLOCK_ACTS)
    ap.add_argument(
        "--block-layouts",
        nargs="+",
        default=["contiguous"],
        choices=["contiguous", "channels_last"],
        help="the block's memory formats of x (NCHW, channels_last)",
    )
    ap.add_argument(
        "--block-providers", nargs="+", default=["eager", "compile", "fused"], choices=["eager", "compile", "fused"]
    )
    ap.add_argument(
        "--system-malloc", action="store_true", help="CPU: leave glibc's malloc as it is (see harness.steady_malloc)"
    )
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=60.0)
    ap.add_argument("--min-run-time", type=float, default=0.6, help="CPU: seconds per provider and case")
    ap.add_argument(
        "--rounds",
        type=int,
        default=9,
        help="CPU: alternating rounds; a CPU speedup is the median of the rounds' ratios",
    )
    args = ap.parse_args(argv)
    if args.overhead:
        if args.device == "cuda":
            ap.error("--overhead times the CPU: use --device cpu")
        args.sizes = args.sizes or overhead.OVERHEAD_SIZES
    block_shapes = args.shapes
    sweep.fill_defaults(args)
    if args.block:
        args.shapes = block_shapes or ["x".join(map(str, s)) for s in block.BLOCK_SHAPES]
    args.shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = versions(args.device)
    if args.device == "cpu" and not args.system_malloc:
        meta["device"] += f", malloc: {steady_malloc()}"
    suffix = "-overhead" if args.overhead else "-block" if args.block else ""
    csv_path = Path(args.csv) if args.csv else results_csv(meta, suffix)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    (overhead if args.overhead else block if args.block else sweep).run(args, meta, csv_path)
    print(f"\nCSV: {csv_path}")
    if args.plot and not (args.overhead or args.block):
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "plot.py"), str(csv_path)], check=True)
    return csv_path


if __name__ == "__main__":
    main()
