"""A markdown table of a benchmark CSV (benchmarks/bench.py): the speedup of a provider
over eager PyTorch, forward and forward+backward, per op, dtype and size; acon_c per
layout and beta. Several CSVs (e.g. one thread and two) give one column group each.

    python benchmarks/table.py benchmarks/results/<run>.csv [more.csv ...] [--provider native]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

MODES = ["forward", "forward+backward"]


def load(path):
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["metric"] == "time"]


def case_key(r):
    extra = f" {r['layout']}" + (f" β per {r['beta']}" if r["beta"] else "") if r["op"] == "acon_c" else ""
    return (r["op"] + extra, r["dtype"], int(r["numel"]), r["shape"])


def speedups(rows, provider):
    """{case: {mode: speedup over eager, or the provider's status}}"""
    out = {}
    for r in rows:
        if r["provider"] != provider or r["mode"] not in MODES:
            continue
        cell = f"{float(r['speedup_vs_eager']):.2f}x" if r["status"] == "ok" and r["speedup_vs_eager"] else r["status"]
        out.setdefault(case_key(r), {})[r["mode"]] = cell
    return out


def table(paths, provider="native", min_numel=0):
    runs = [(Path(p), load(p)) for p in paths]
    cols = [speedups(rows, provider) for _, rows in runs]
    cases = sorted({k for c in cols for k in c if k[2] >= min_numel}, key=lambda k: (k[0], k[1], k[2]))
    lines = []
    for path, rows in runs:
        r = rows[0]
        lines.append(f"- `{path.name}`: {r['device']}; {r['isa']}; torch {r['torch']}, {r['date']}")
    head = "| op | dtype | shape |" + "".join(f" fwd ({i + 1}) | fwd+bwd ({i + 1}) |" for i in range(len(runs)))
    lines += ["", head, "|" + "---|" * (3 + 2 * len(runs))]
    for k in cases:
        op, dtype, _, shape = k
        cells = "".join(
            f" {c.get(k, {}).get('forward', '')} | {c.get(k, {}).get('forward+backward', '')} |" for c in cols
        )
        lines.append(f"| {op} | {dtype} | {shape} |{cells}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--provider", default="native")
    ap.add_argument("--min-numel", type=int, default=0, help="leave out smaller cases")
    args = ap.parse_args(argv)
    print(table(args.csv, args.provider, args.min_numel))


if __name__ == "__main__":
    main()
