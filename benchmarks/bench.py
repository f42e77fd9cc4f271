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
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fusedact
from fusedact import reference

ROOT = Path(__file__).resolve().parent
OPS = ["swish", "mish", "hard_swish", "acon_c"]
PROVIDERS = ["eager", "compile", "native", "triton"]
MODES = ["forward", "backward", "forward+backward", "memory"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOOR_ELEMENT_PASSES = {"forward": 2, "backward": 3, "forward+backward": 5}
ACON_C = 64  # channels of the acon_c benchmark tensors: (N, 64, 32, 32) and friends

CSV_FIELDS = ["date", "device", "torch", "cuda", "triton", "fusedact", "isa", "op", "dtype", "layout", "beta",
              "numel", "shape", "provider", "mode", "metric", "unit", "p50", "p20", "p80", "gbps",
              "pct_copy", "speedup_vs_eager", "speedup_vs_compile", "copy_gbps", "status", "eager_round_ratios"]


# ---- the cases


def eager_acon_c(x, p1, p2, beta):
    """The ACON-C module of the paper's code and YOLOv5."""
    dpx = (p1 - p2) * x
    return dpx * torch.sigmoid(beta * dpx) + p2 * x


def make_case(op, dtype, numel, layout, beta_kind, device, shape=None):
    """x, the incoming gradient, parameters (as the eager module holds them) and the
    shape; sizes are rounded to whole tensors of the op's shape, unless `shape` is given
    (NCHW: acon_c's channels are its dim 1)."""
    gen = torch.Generator().manual_seed(0)
    if shape is not None:
        shape = tuple(shape)
    elif op == "acon_c":
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
    if op == "acon_c":
        pdt = torch.float32  # parameters stay float32, as under autocast (SPEC.md)
        pshape = (1, shape[1], 1, 1)
        bshape = (shape[0], shape[1], 1, 1) if beta_kind == "sample" else pshape
        params = [torch.randn(pshape, generator=gen).to(pdt), torch.randn(pshape, generator=gen).to(pdt),
                  (1 + 0.5 * torch.randn(bshape, generator=gen)).to(pdt)]
        params = [p.to(device) for p in params]
    return x, g, params, shape


def fns(op):
    """{provider: f(x, *params)}. native is the call users write, `fusedact.mish(x)` (the
    default backend): with caches cold after a large tensor, the keyword
    `backend="native"` alone costs about 0.5 us a call (2^20 elements, 2 threads)."""
    if op == "acon_c":
        def eager(x, p1, p2, beta):
            return eager_acon_c(x, p1, p2, beta).to(x.dtype)

        def fused(backend):
            if backend == "native":
                return lambda x, p1, p2, beta: fusedact.acon_c(x, p1, p2, beta)
            return lambda x, p1, p2, beta: fusedact.acon_c(x, p1, p2, beta, backend=backend)
    else:
        eager_fn = {"swish": F.silu, "mish": F.mish, "hard_swish": F.hardswish}[op]

        def eager(x):
            return eager_fn(x)

        def fused(backend):
            f = getattr(fusedact, op)
            if backend == "native":
                return lambda x: f(x)
            return lambda x: f(x, backend=backend)
    return {"eager": eager, "compile": eager, "native": fused("native"), "triton": fused("triton")}


def reference64(op, x, params):
    xs = x.detach().double().requires_grad_()
    ps = [p.detach().double() for p in params]
    y = reference.acon_c(xs, *ps) if op == "acon_c" else getattr(reference, op)(xs)
    return xs, y


# ---- timing


def bench_gpu(fn, warmup_ms, rep_ms):
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return q[0], q[1], q[2]


def bench_cpu(fns_by_provider, min_run_time, rounds):
    """({provider: (p50, p20, p80) ms}, {provider: [each round's median ms]}): the
    providers timed in alternating rounds, in reverse order every other round (A B, B A,
    ...), so that a drift of the host's state reaches each about equally."""
    from torch.utils import benchmark

    timers = {p: benchmark.Timer(stmt="f()", globals={"f": f}, num_threads=torch.get_num_threads())
              for p, f in fns_by_provider.items()}
    samples = {p: [] for p in timers}
    per_round = {p: [] for p in timers}
    order = list(timers)
    for r in range(rounds):
        for p in order if r % 2 == 0 else order[::-1]:
            m = timers[p].blocked_autorange(min_run_time=min_run_time / rounds)
            samples[p].extend(x * 1e3 for x in m.times)
            per_round[p].append(m.median * 1e3)
    out = {}
    for p, v in samples.items():
        v = sorted(v)
        pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
        out[p] = (pick(0.5), pick(0.2), pick(0.8))
    return out, per_round


def paired_speedup(per_round, ref, p):
    """The median over rounds of ref's time over p's time in the same round, and those
    ratios. On a shared host whose memory bandwidth changes for seconds at a time, a
    ratio of pooled medians can compare one provider's fast phase with the other's slow
    one; a round's two blocks run back to back."""
    ratios = [a / b for a, b in zip(per_round[ref], per_round[p])]
    return statistics.median(ratios), ratios


def copy_time(numel, dtype, device, args):
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    if device == "cuda":
        return bench_gpu(lambda: dst.copy_(src), args.warmup_ms, args.rep_ms)
    return bench_cpu({"copy": lambda: dst.copy_(src)}, args.min_run_time, args.rounds)[0]["copy"]


# ---- memory


def saved_bytes(run, exclude=()):
    """Bytes of the distinct storages the autograd graph of run() saves, but those of
    the tensors in ``exclude`` (a model's parameters, say)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
        except Exception:  # a tensor without storage (compiled graphs may save symbols)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def peak_bytes(run, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ---- the run


class Progress:
    """A progress bar on stderr (no dependency)."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.time()

    def step(self, label):
        self.done += 1
        frac = self.done / max(1, self.total)
        bar = "#" * int(30 * frac)
        el = time.time() - self.start
        eta = el / frac - el if frac > 0 else 0
        sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} {el:5.0f}s eta {eta:4.0f}s {label[:40]:<40}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def versions(device):
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = ""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"cpu: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
            "cuda": torch.version.cuda or "", "triton": triton_v, "fusedact": fusedact.__version__,
            "isa": isa_line(device)}


def isa_line(device):
    """The CPU instruction set each side runs: ATen picks its kernels at run time
    (ATEN_CPU_CAPABILITY overrides), fusedact its loops (FUSEDACT_CPU_ISA overrides)."""
    if device == "cuda":
        return ""
    return f"torch {torch.backends.cpu.get_cpu_capability()}, fusedact {fusedact.build_info()['cpu_isa']}"


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
    providers = [p for p in args.providers if not (p == "triton" and (device != "cuda" or not fusedact.triton.available()))]
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
                runs[p] = (lambda f=f: f(xl, *leaves_p))
            elif mode == "forward+backward":
                runs[p] = (lambda f=f: torch.autograd.grad(f(xl, *leaves_p), inputs, g))
            else:
                y = f(xl, *leaves_p)
                runs[p] = (lambda y=y: torch.autograd.grad(y, inputs, g, retain_graph=True))
        if device == "cuda":
            for p, r in runs.items():
                results[(p, mode)] = bench_gpu(r, args.warmup_ms, args.rep_ms)
        elif runs:
            times, per_round = bench_cpu(runs, args.min_run_time, args.rounds)
            results.update({(p, mode): t for p, t in times.items()})
            rounds.update({(p, mode): t for p, t in per_round.items()})
        runs.clear()

    base = {"op": op, "dtype": dtype_name, "layout": layout, "beta": beta_kind if op == "acon_c" else "",
            "numel": n, "shape": "x".join(map(str, shape)), **meta}
    for mode in [m for m in args.modes if m != "memory"]:
        nbytes = FLOOR_ELEMENT_PASSES[mode] * n * es
        for p in providers:
            row = dict(base, provider=p, mode=mode, metric="time", unit="ms", copy_gbps=f"{copy_gbps:.1f}")
            if (p, mode) not in results:
                row["status"] = status[p] or "not run"
            else:
                t50, t20, t80 = results[(p, mode)]
                gbps = nbytes / t50 / 1e6
                row.update(p50=f"{t50:.5f}", p20=f"{t20:.5f}", p80=f"{t80:.5f}", gbps=f"{gbps:.1f}",
                           pct_copy=f"{100 * gbps / copy_gbps:.1f}", status="ok")
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
                    row = dict(base, provider=p, mode="memory", metric="peak_bytes", unit="bytes",
                               p50="" if math.isnan(pk) else str(pk), status="ok" if not math.isnan(pk) else "cpu: not measured")
                except Exception as e:
                    row["status"] = f"failed: {type(e).__name__}"
            writer.writerow(row)
            rows.append(row)
    progress.step(f"{op} {dtype_name} {layout} {beta_kind} " + "x".join(map(str, shape)))


# ---- call overhead: small tensors, one thread


OVERHEAD_SIZES = [8, 12, 16]
OVERHEAD_MODES = ["forward (no grad)", "forward+backward"]


def overhead_case(op, numel):
    """x (and g, params) for the overhead case: 1-D for the unary ops, (4, 16, L) with
    per-channel (16,) parameters for acon_c."""
    gen = torch.Generator().manual_seed(0)
    shape = (4, 16, max(1, numel // 64)) if op == "acon_c" else (numel,)
    x = torch.randn(shape, generator=gen) * 3
    params = []
    if op == "acon_c":
        params = [torch.randn(1, 16, 1, generator=gen), torch.randn(1, 16, 1, generator=gen), 1 + 0.5 * torch.rand(1, 16, 1, generator=gen)]
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
                if op == "acon_c":  # fusedact takes (C,) parameters for channel_dim=1 on any rank
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
                        row = dict(meta, op=op, dtype="float32", layout="contiguous", beta="channel" if op == "acon_c" else "",
                                   numel=x.numel(), shape="x".join(map(str, x.shape)), provider=p,
                                   mode=f"overhead: {mode}, 1 thread", metric="time", unit="ms",
                                   p50=f"{t50:.5f}", p20=f"{t20:.5f}", p80=f"{t80:.5f}", status="ok")
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
        print(f"{op:<11}{n:>8}  {mode:<38}{t['eager']:>10.2f}{t['native']:>11.2f}{t['native'] / t['eager']:>13.2f}x", file=out)


def print_table(rows, out=sys.stdout):
    """time, GB/s, % of copy and speedups, one line per (case, mode, provider)."""
    hdr = f"{'op':<10} {'dtype':<8} {'layout':<13} {'beta':<7} {'numel':>10} {'mode':<16} {'provider':<8} " \
          f"{'ms':>9} {'GB/s':>7} {'%copy':>6} {'x eager':>8} {'x comp':>7}"
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for r in rows:
        if r["metric"] != "time":
            continue
        if r["status"] != "ok":
            print(f"{r['op']:<10} {r['dtype']:<8} {r['layout']:<13} {r['beta']:<7} {r['numel']:>10} {r['mode']:<16} "
                  f"{r['provider']:<8} {r['status']}", file=out)
            continue
        print(f"{r['op']:<10} {r['dtype']:<8} {r['layout']:<13} {r['beta']:<7} {r['numel']:>10} {r['mode']:<16} "
              f"{r['provider']:<8} {float(r['p50']):9.4f} {float(r['gbps']):7.1f} {float(r['pct_copy']):6.1f} "
              f"{r.get('speedup_vs_eager') or '':>8} {r.get('speedup_vs_compile') or '':>7}", file=out)
    mem = [r for r in rows if r["metric"] != "time" and r["status"] == "ok"]
    if mem:
        print("\nmemory of one forward+backward (MiB): saved by the autograd graph / peak beyond inputs", file=out)
        keyed = {}
        for r in mem:
            keyed.setdefault((r["op"], r["dtype"], r["layout"], r["beta"], r["numel"], r["provider"]), {})[r["metric"]] = float(r["p50"])
        for (op, dt, lay, beta, n, p), m in keyed.items():
            pk = m.get("peak_bytes")
            print(f"{op:<10} {dt:<8} {lay:<13} {beta:<7} {n:>10} {p:<8} saved {m.get('saved_bytes', float('nan')) / 2**20:9.2f}"
                  + (f"  peak {pk / 2**20:9.2f}" if pk is not None else ""), file=out)


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if gpu else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    ap.add_argument("--sizes", nargs="*", type=int, default=None, help="log2 of the element counts")
    ap.add_argument("--shapes", nargs="*", default=None,
                    help="explicit NCHW shapes as well, e.g. 32x64x56x56 (acon_c's channels are dim 1)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                    choices=["contiguous", "channels_last"], help="acon_c's layouts (NCHW, channels_last)")
    ap.add_argument("--betas", nargs="+", default=None, choices=["channel", "sample"],
                    help="acon_c's beta: per channel (ACON-C) or per sample (Meta-ACON)")
    ap.add_argument("--quick", action="store_true", help="a few sizes, float32 and bfloat16, per-channel beta")
    ap.add_argument("--csv", default=None, help="where the CSV goes (default benchmarks/results/<device>.csv)")
    ap.add_argument("--plot", action="store_true", help="then run benchmarks/plot.py on the CSV")
    ap.add_argument("--overhead", action="store_true",
                    help="the call-overhead case instead: tensors of 2^8, 2^12, 2^16 elements (or --sizes), "
                         "one thread, CPU, no-grad forward and forward+backward, native against eager")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=60.0)
    ap.add_argument("--min-run-time", type=float, default=0.6, help="CPU: seconds per provider and case")
    ap.add_argument("--rounds", type=int, default=9,
                    help="CPU: alternating rounds; a CPU speedup is the median of the rounds' ratios")
    args = ap.parse_args(argv)
    on_gpu = args.device == "cuda"
    if args.overhead:
        if on_gpu:
            ap.error("--overhead times the CPU: use --device cpu")
        args.sizes = args.sizes or OVERHEAD_SIZES
    if args.sizes is None:
        args.sizes = ([16, 20, 24, 26] if not args.quick else [20, 26]) if on_gpu else ([12, 16, 20] if not args.quick else [20])
    if args.shapes is None:
        # the first stage of a ResNet/YOLO backbone at batch 32: the CPU's real-model case
        args.shapes = [] if on_gpu else ["32x64x56x56"]
    args.shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16", "float16"] if (on_gpu and not args.quick) else ["float32", "bfloat16"]
    if args.betas is None:
        args.betas = ["channel", "sample"] if (on_gpu and not args.quick) else ["channel"]
    return args


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = versions(device)
    slug = "".join(ch if ch.isalnum() else "-" for ch in (meta["device"] + " " + meta["isa"]).lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    suffix = "-overhead" if args.overhead else ""
    csv_path = Path(args.csv) if args.csv else ROOT / "results" / f"{slug[:90]}{suffix}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if args.overhead:
        rows = []
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            run_overhead(args, meta, writer, rows)
        print_overhead_table(rows)
        print(f"\nCSV: {csv_path}")
        return csv_path
    cases = []
    for op in args.ops:
        layouts = args.layouts if op == "acon_c" else ["contiguous"]
        betas = args.betas if op == "acon_c" else ["-"]
        for dt in args.dtypes:
            for size in args.sizes:
                cases += [(op, dt, 1 << size, lay, b, None) for lay in layouts for b in betas]
            for shape in args.shapes:
                cases += [(op, dt, math.prod(shape), lay, b, shape) for lay in layouts for b in betas]
    print(f"fusedact benchmark on {meta['device']}: torch {meta['torch']}, CUDA {meta['cuda'] or '-'}, "
          f"triton {meta['triton'] or '-'}, fusedact {meta['fusedact']}"
          + (f"; instruction sets: {meta['isa']}" if meta["isa"] else "") + f"; {len(cases)} cases", flush=True)
    rows = []
    progress = Progress(len(cases))
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for *case, shape in cases:
            run_case(*case, args, device, meta, writer, rows, progress, shape)
            fh.flush()
    print()
    print_table(rows)
    print(f"\nCSV: {csv_path}")
    if args.plot:
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "plot.py"), str(csv_path)], check=True)
    return csv_path


if __name__ == "__main__":
    main()
