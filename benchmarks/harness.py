"""The benchmarks' harness: timing, paired speedups, copy bandwidth, memory, the
versions and device of a run, a progress bar and the CSV (benchmarks/README.md).

GPU: CUDA-event timing by triton.testing.do_bench (warm-up, L2 flushed before every
run), the median and the 20/80 quantiles. CPU: torch.utils.benchmark medians, the
providers timed in alternating rounds (A B, B A, ...), a speedup the median over
rounds of the two providers' ratio within a round.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fusedact

ROOT = Path(__file__).resolve().parent

CSV_FIELDS = [
    "date",
    "device",
    "torch",
    "cuda",
    "triton",
    "fusedact",
    "isa",
    "op",
    "dtype",
    "layout",
    "beta",
    "numel",
    "shape",
    "provider",
    "mode",
    "metric",
    "unit",
    "p50",
    "p20",
    "p80",
    "gbps",
    "pct_copy",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "copy_gbps",
    "status",
    "eager_round_ratios",
]


def results_csv(meta, suffix=""):
    """benchmarks/results/<device and both ISAs><suffix>.csv, the default CSV of a run."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in (meta["device"] + " " + meta["isa"]).lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return ROOT / "results" / f"{slug[:90]}{suffix}.csv"


@contextlib.contextmanager
def csv_writer(path, fields=CSV_FIELDS):
    """(file, csv.DictWriter) of a new CSV at path, its header written."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        yield fh, writer


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

    timers = {
        p: benchmark.Timer(stmt="f()", globals={"f": f}, num_threads=torch.get_num_threads())
        for p, f in fns_by_provider.items()
    }
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


def steady_malloc() -> str:
    """glibc's malloc told to keep freed memory (no mmap, no trim), as jemalloc and tcmalloc
    do; returns what the CSVs record. glibc serves blocks over 32 MB by mmap and returns
    them on free, so every step of a (32, 64, 56, 56) float32 block faulted its 51 MB
    tensors in afresh, in some processes and not others: eager 2504 page faults and 3.4 ms
    of system time a step, fused steps of 7 or 13 ms from one run to the next. "system"
    where this is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
        if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1):
            return "glibc, no mmap or trim"
    except (OSError, AttributeError):
        pass
    return "system"


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
        try:  # the model name, then family/model: VMs often name only "AMD EPYC"
            info = {}
            for line in open("/proc/cpuinfo"):
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
            if "model name" in info:
                cpu = info["model name"]
                if "cpu family" in info:
                    cpu += f" family {info['cpu family']} model {info.get('model', '?')}"
        except OSError:
            pass
        name = f"cpu: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.date.today().isoformat(),
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": triton_v,
        "fusedact": fusedact.__version__,
        "isa": isa_line(device),
    }


def isa_line(device):
    """The CPU instruction set each side runs: ATen picks its kernels at run time
    (ATEN_CPU_CAPABILITY overrides), fusedact its loops (FUSEDACT_CPU_ISA overrides)."""
    if device == "cuda":
        return ""
    return f"torch {torch.backends.cpu.get_cpu_capability()}, fusedact {fusedact.build_info()['cpu_isa']}"
