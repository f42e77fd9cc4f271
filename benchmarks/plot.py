"""Plots of a benchmark CSV (benchmarks/bench.py): for each op and dtype, the % of copy
bandwidth (GPU) or the time per element (CPU) against the tensor size, one line per
provider, one panel per mode; and a summary of the forward+backward speedups.

    python benchmarks/plot.py benchmarks/results/<device>.csv [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ["forward", "backward", "forward+backward"]
COLORS = {"eager": "tab:gray", "compile": "tab:blue", "native": "tab:red", "triton": "tab:green"}


def load(path):
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["metric"] == "time" and r["status"] == "ok"]


def where(rows) -> str:
    """The device, and on the CPU the instruction sets both sides ran."""
    isa = rows[0].get("isa") or ""
    return rows[0]["device"] + (f"\n{isa}" if isa else "")


def plot_sweeps(rows, out: Path) -> list[Path]:
    on_gpu = not rows[0]["device"].startswith("cpu")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["dtype"], r["layout"], r["beta"])].append(r)
    written = []
    for (op, dtype, layout, beta), rs in sorted(groups.items()):
        fig, axes = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 3.8), sharey=on_gpu)
        for ax, mode in zip(axes, MODES):
            by_p = defaultdict(list)
            for r in rs:
                if r["mode"] == mode:
                    n = int(r["numel"])
                    y = float(r["pct_copy"]) if on_gpu else float(r["p50"]) * 1e6 / n
                    by_p[r["provider"]].append((n, y))
            for p, pts in sorted(by_p.items()):
                pts.sort()
                ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", label=p, color=COLORS.get(p))
            ax.set_xscale("log", base=2)
            ax.set_title(mode)
            ax.set_xlabel("elements")
            ax.grid(alpha=0.3)
            if on_gpu:
                ax.axhline(100, color="k", lw=0.8, ls="--")
                ax.set_ylabel("% of copy bandwidth")
            else:
                ax.set_ylabel("ns per element")
        axes[0].legend()
        extra = f", {layout}" + (f", beta per {beta}" if beta else "") if op == "acon_c" else ""
        fig.suptitle(f"{op} {dtype}{extra} on {where(rows)}")
        fig.tight_layout()
        name = f"{op}-{dtype}" + (f"-{layout}-{beta}" if op == "acon_c" else "") + ".png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(out / name)
    return written


def plot_headline(rows, out: Path, numel: int, name: str) -> Path:
    """forward+backward speedup of native (and triton) over eager and torch.compile at
    one size, per op and dtype."""
    sel = [
        r
        for r in rows
        if r["mode"] == "forward+backward"
        and int(r["numel"]) == numel
        and r["provider"] in ("native", "triton")
        and (r["op"] != "acon_c" or (r["layout"], r["beta"]) in (("contiguous", "channel"), ("", "")))
    ]
    labels, vs_eager, vs_compile, provs = [], [], [], []
    for r in sel:
        labels.append(f"{r['op']}\n{r['dtype']}\n{r['provider']}")
        vs_eager.append(float(r["speedup_vs_eager"] or "nan"))
        vs_compile.append(float(r["speedup_vs_compile"] or "nan"))
        provs.append(r["provider"])
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels)), 4.4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], vs_eager, 0.4, label="vs eager")
    ax.bar([x + 0.2 for x in xs], vs_compile, 0.4, label="vs torch.compile")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("speedup (forward+backward)")
    shape = sel[0]["shape"] if sel else str(numel)
    ax.set_title(f"fusedact at {numel} elements ({shape}) on {where(rows)}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_headlines(rows, out: Path) -> list[Path]:
    """headline.png at the largest size, and headline-<numel>.png at every size of 2^20
    elements or more."""
    sizes = sorted({int(r["numel"]) for r in rows})
    written = [plot_headline(rows, out, sizes[-1], "headline.png")]
    written += [plot_headline(rows, out, n, f"headline-{n}.png") for n in sizes if n >= 2**20]
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--out", default=None, help="default: a folder beside the CSV, named after it")
    args = ap.parse_args(argv)
    path = Path(args.csv)
    out = Path(args.out) if args.out else path.with_suffix("")
    out.mkdir(parents=True, exist_ok=True)
    rows = load(path)
    if not rows:
        raise SystemExit(f"{path}: no successful time measurements to plot")
    written = plot_sweeps(rows, out) + plot_headlines(rows, out)
    print(f"plots: {out} ({len(written)} PNG files)")
    return out


if __name__ == "__main__":
    main()
