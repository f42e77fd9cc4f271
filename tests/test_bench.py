"""benchmarks/bench.py runs end to end on a tiny CPU case and writes its CSV; its float64
check catches a provider that is off. Speed is never asserted here."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench  # noqa: E402
import block  # noqa: E402
import cases  # noqa: E402
import overhead  # noqa: E402

# The CSV's columns, which benchmarks/plot.py, table.py and the committed results read.
HEADER = [
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
FNS = cases.fns  # the real providers, which the sabotaged ones below wrap
TINY = ["--device", "cpu", "--ops", "mish", "--min-run-time", "0.02", "--rounds", "2"]


def run_bench(*args):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), *TINY, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_sweep_writes_a_row_per_provider_and_mode(tmp_path):
    path = tmp_path / "sweep.csv"
    out = run_bench(
        "--dtypes", "float32", "--sizes", "12", "--shapes", "--providers", "eager", "native", "--csv", str(path)
    )
    header, rows = read_csv(path)
    assert header == HEADER
    timed = {(r["provider"], r["mode"]): r for r in rows if r["metric"] == "time"}
    assert set(timed) == {(p, m) for p in ("eager", "native") for m in ("forward", "backward", "forward+backward")}
    for r in timed.values():
        assert (r["op"], r["dtype"], r["numel"], r["shape"], r["status"]) == ("mish", "float32", "4096", "4x1024", "ok")
        assert float(r["p50"]) > 0 and float(r["copy_gbps"]) > 0
        ratios = r["eager_round_ratios"].split(";") if r["eager_round_ratios"] else []
        assert float(r["speedup_vs_eager"]) > 0 and len(ratios) == (2 if r["provider"] == "native" else 0)
    memory = {(r["provider"], r["metric"]): r["status"] for r in rows if r["mode"] == "memory"}
    assert memory == {
        (p, m): s for p in ("eager", "native") for m, s in (("saved_bytes", "ok"), ("peak_bytes", "cpu: not measured"))
    }
    assert "forward+backward native" in " ".join(out.split()) and f"CSV: {path}" in out


def test_overhead_writes_a_row_per_provider_and_mode(tmp_path):
    path = tmp_path / "overhead.csv"
    out = run_bench("--overhead", "--sizes", "8", "--csv", str(path))
    header, rows = read_csv(path)
    assert header == HEADER
    assert sorted((r["provider"], r["mode"]) for r in rows) == sorted(
        (p, f"overhead: {m}, 1 thread") for p in ("eager", "native") for m in overhead.OVERHEAD_MODES
    )
    assert all(r["status"] == "ok" and r["numel"] == "256" for r in rows)
    assert "native/eager" in out


def test_block_writes_a_row_per_provider_and_layout(tmp_path):
    path = tmp_path / "block.csv"
    out = run_bench(
        "--block",
        "--dtypes",
        "float32",
        "--shapes",
        "4x8x4x4",
        "--block-acts",
        "silu",
        "--block-providers",
        "eager",
        "fused",
        "--block-layouts",
        "contiguous",
        "channels_last",
        "--csv",
        str(path),
    )
    header, rows = read_csv(path)
    assert "layout" in header
    got = sorted((r["provider"], r["layout"]) for r in rows)
    assert got == sorted((p, lay) for p in ("eager", "fused") for lay in ("contiguous", "channels_last"))
    assert all(r["shape"] == "4x8x4x4" and float(r["p50_ms"]) > 0 for r in rows)
    assert "4x8x4x4 CL" in out


def test_block_check_fails_ours_off_and_notes_pytorch_off(capsys):
    """The block's float64 check raises for a fused block 1% off, and prints (times
    anyway) PyTorch's own providers off by the same."""
    torch.manual_seed(0)
    eager, fused = block.blocks("silu", 8)
    x = torch.randn(4, 8, 4, 4, requires_grad=True)
    g = torch.randn(4, 8, 4, 4)
    x64 = x.detach().double().requires_grad_()
    y64 = copy.deepcopy(eager).double()(x64)
    y64.backward(g.double())
    ref = (y64.detach(), x64.grad)
    block._check("fused", fused, x, g, ref)  # right: passes

    class Off(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t) * 1.01

    with pytest.raises(AssertionError, match="fused y"):
        block._check("fused", Off(fused), x, g, ref)
    block._check("eager", Off(eager), x, g, ref)
    assert "note: eager y" in capsys.readouterr().out


def off_by_one_percent(op):
    """fns(op) with native's output 1% off."""
    funcs = FNS(op)
    native = funcs["native"]
    return dict(funcs, native=lambda *a: native(*a) * 1.01)


def gradient_off(op):
    """fns(op) with native's forward right and its dx 1% off."""
    funcs = FNS(op)
    native = funcs["native"]
    return dict(funcs, native=lambda x, *p: native(x, *p) + 0.01 * (x - x.detach()))


@pytest.mark.parametrize("op", cases.OPS)
def test_check_flags_an_output_or_gradient_off(op):
    x, g, params, _ = cases.make_case(op, torch.float32, 4096, "contiguous", "channel", "cpu")
    assert cases.check(op, "native", x, g, params, FNS(op)["native"]) == ""
    assert cases.check(op, "native", x, g, params, off_by_one_percent(op)["native"]).startswith("native y off")
    assert cases.check(op, "native", x, g, params, gradient_off(op)["native"]).startswith("native dx off")


def test_sweep_reports_a_provider_that_is_off_and_does_not_time_it(tmp_path, monkeypatch):
    monkeypatch.setattr(cases, "fns", off_by_one_percent)
    path = tmp_path / "off.csv"
    bench.main(
        [
            *TINY,
            "--dtypes",
            "float32",
            "--sizes",
            "10",
            "--shapes",
            "--providers",
            "eager",
            "native",
            "--modes",
            "forward",
            "--csv",
            str(path),
        ]
    )
    rows = {r["provider"]: r for r in read_csv(path)[1]}
    assert rows["eager"]["status"] == "ok"
    assert rows["native"]["status"].startswith("native y off: rel L2 error") and rows["native"]["p50"] == ""


def test_overhead_refuses_a_provider_that_is_off(monkeypatch, tmp_path):
    monkeypatch.setattr(overhead, "fns", off_by_one_percent)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="native y off"):
        bench.main([*TINY, "--overhead", "--sizes", "8", "--csv", str(tmp_path / "off.csv")])
    assert torch.get_num_threads() == threads  # the overhead case's one thread is undone


def test_models_script_runs_and_counts_saved_bytes(tmp_path):
    """benchmarks/models.py end to end on its torch-only model, eager, one round: a row of
    converted against original, and the converted ACON model (ACON-C kernels, fused
    BatchNorm) saves fewer bytes than YOLOv5's eager modules (83 against 137 MB); a
    convert that did nothing would save the same."""
    import models  # noqa: E402 (benchmarks/ is on the path above)

    path = tmp_path / "models.csv"
    args = ["--models", "acon_yolov5", "--modes", "eager", "--rounds", "1", "--min-time", "0", "--control"]
    models.main([*args, "--device", "cpu", "--csv", str(path)])
    header, rows = read_csv(path)
    assert header == models.FIELDS
    row, control = rows
    assert (row["model"], row["variant"], row["reference"]) == ("acon_yolov5", "converted eager", "original eager")
    assert float(row["ms"]) > 0 and float(row["speed"]) > 0
    assert 0 < float(row["saved_mb"]) < 0.7 * float(row["reference_saved_mb"]), row
    assert (control["variant"], control["reference"]) == ("original eager again", "original eager")  # --control
    assert control["saved_mb"] == control["reference_saved_mb"] and float(control["speed"]) > 0
